"""mutualkd: online (mutual) knowledge distillation for peer groups of students.

The names a plugin needs are importable from here (loaded on first use, so that `import mutualkd.models`
stays light for exported checkpoints):

    from mutualkd import Term, TermConfig, TeacherTerm, TeacherTermConfig, register_term, functional

`Trainer` and `load_config` are the programmatic entry points.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "register_term": "mutualkd.registry",
    "TERMS": "mutualkd.registry",
    "Term": "mutualkd.losses.base",
    "TermRNG": "mutualkd.losses.base",
    "BuildContext": "mutualkd.losses.base",
    "UpdatePhase": "mutualkd.losses.base",
    "TermConfig": "mutualkd.config",
    "load_config": "mutualkd.config",
    "TeacherTerm": "mutualkd.losses.teacher",
    "TeacherTermConfig": "mutualkd.losses.teacher",
    "GroupOutput": "mutualkd.peers",
    "TeacherOutput": "mutualkd.teachers",
    "Trainer": "mutualkd.engine.trainer",
    "UserError": "mutualkd.errors",
}
__all__ = [*_PUBLIC, "functional"]


def __getattr__(name: str):
    if name == "functional":
        return import_module("mutualkd.losses.functional")
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mutualkd' has no attribute {name!r}")
