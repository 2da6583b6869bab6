"""Moved: the caching job's ``audit`` command is ``python -m teacher.audit`` (the Ray job lives with the
teacher it runs; docs/DESIGN.md has the map). This stub only refuses, naming the new command."""
import sys

if __name__ == "__main__":
    print(f"pipeline.audit moved: run  python -m teacher.audit {' '.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
    sys.exit(2)
raise ImportError("pipeline.audit moved to teacher.audit (docs/DESIGN.md has the map)")
