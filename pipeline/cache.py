"""Moved: the caching job's ``cache`` command is ``python -m teacher.cache`` (the Ray job lives with the
teacher it runs; docs/DESIGN.md has the map). This stub only refuses, naming the new command."""
import sys

if __name__ == "__main__":
    print(f"pipeline.cache moved: run  python -m teacher.cache {' '.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
    sys.exit(2)
raise ImportError("pipeline.cache moved to teacher.cache (docs/DESIGN.md has the map)")
