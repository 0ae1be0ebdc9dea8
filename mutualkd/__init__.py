"""mutualkd: online (mutual) knowledge distillation for peer groups of students."""

__version__ = "0.1.0"
