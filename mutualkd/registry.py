"""The term registry: config name -> (config schema, term module). Built-in terms register on import of
`mutualkd.losses`; a plugin registers its own the same way (`mutualkd train --plugin my_terms.py`).

The config union of `objective.terms` and every per-kind property (needs a teacher, works under peer-parallel
placement, needs embeddings) are read from here, so a term is declared in exactly one place: its module.

    from typing import Literal
    from mutualkd import Term, TermConfig, register_term

    class LogitNormConfig(TermConfig):
        name: Literal["logit_norm"] = "logit_norm"
        weight: float = 0.01

    @register_term("logit_norm", LogitNormConfig)
    class LogitNorm(Term):
        peer_parallel = True  # reads only logits

        def forward(self, out, batch, teach=None):
            per_peer = out.logits.float().pow(2).mean(dim=(1, 2))
            return {"loss": per_peer.sum(), "per_peer": per_peer}
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path

from mutualkd.errors import UserError, first_line


@dataclass(frozen=True)
class TermSpec:
    """One registered term: its config name, schema and module class."""

    name: str
    config: type  # a `mutualkd.config.TermConfig` subclass
    term: type  # a `mutualkd.losses.base.Term` subclass

    @property
    def source(self) -> str:
        return self.term.__module__


class Registry:
    """Config names of terms, in registration order (built-ins first)."""

    def __init__(self) -> None:
        self._specs: dict[str, TermSpec] = {}
        self._builtins_loaded = False

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module("mutualkd.losses")  # each method module registers itself

    def register(self, name: str, config: type):
        """Class decorator: register a `Term` subclass under `name` with its config schema `config`."""
        from mutualkd.config import TermConfig
        from mutualkd.losses.base import Term

        def add(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, Term)):
                raise TypeError(f"register_term({name!r}): {cls!r} is not a mutualkd Term subclass")
            if not (isinstance(config, type) and issubclass(config, TermConfig)):
                raise TypeError(f"register_term({name!r}): the config {config!r} is not a TermConfig subclass")
            field = config.model_fields.get("name")
            if field is None or typing.get_args(field.annotation) != (name,) or field.default != name:
                raise TypeError(f"register_term({name!r}): {config.__name__} must declare "
                                f'`name: Literal["{name}"] = "{name}"`')
            if name in self._specs:
                raise UserError(f"term {name!r} is already registered (by {self._specs[name].source}); "
                                "a term name can be registered once")
            cls.name = name
            self._specs[name] = TermSpec(name, config, cls)
            return cls

        return add

    def get(self, name: str) -> TermSpec | None:
        self._load_builtins()
        return self._specs.get(name)

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._specs)

    def specs(self) -> list[TermSpec]:
        self._load_builtins()
        return list(self._specs.values())


TERMS = Registry()
register_term = TERMS.register


def load_plugin(spec: str) -> None:
    """Import a plugin (a `.py` file path, or an importable module name) so that its terms register.
    Loading the same plugin again is a no-op; any failure inside it is one UserError line naming it."""
    path = Path(spec)
    is_file = spec.endswith(".py") or path.is_file()
    if is_file and not path.is_file():
        raise UserError(f"--plugin: no such file: {spec}")
    try:
        if is_file:
            _import_file(path.resolve())
        else:
            importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name == spec:
            raise UserError(f"--plugin: no module named {spec!r} (give a .py file path or an importable module)") \
                from None
        raise UserError(f"--plugin {spec}: {type(err).__name__}: {first_line(err)}") from None
    except Exception as err:  # the plugin's own code failed (UserError from register_term included)
        raise UserError(f"--plugin {spec}: {first_line(err)}") from None


def _import_file(path: Path) -> None:
    name = f"mutualkd_plugin_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    if name in sys.modules:
        return
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
