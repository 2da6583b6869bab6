"""The teacher: the model that scores (``teacher.model``) and the Ray job that runs it once over the
shards and writes the cache (``teacher.cache``). Target rebuild and the format live in ``storage``."""
from teacher.model import Teacher, TeacherConfig, TeacherLoadError, TeacherOutput, build_teacher

__all__ = ["Teacher", "TeacherConfig", "TeacherLoadError", "TeacherOutput", "build_teacher"]
