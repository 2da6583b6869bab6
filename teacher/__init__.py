"""Teacher model and scoring (``teacher.model``); target rebuild lives in ``teacher.targets``."""
from teacher.model import Teacher, TeacherConfig, TeacherLoadError, TeacherOutput, build_teacher

__all__ = ["Teacher", "TeacherConfig", "TeacherLoadError", "TeacherOutput", "build_teacher"]
