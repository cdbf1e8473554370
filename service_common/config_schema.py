"""Declarative config schemas: every key of a service with its type, default, bounds, doc line and variable.

Why: each service declares its keys once. Validation, the defaults its dataclasses take, and the generated
reference (docs/configuration.md, ``make config-docs``) all come from those declarations, so a key cannot be
read with one default and documented with another, and a key nobody declared (a typo, a key in the wrong
section) fails at start, naming the key it most likely meant, instead of being silently ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .config_source import ConfigError, close_match, env_name, to_bool, to_float, to_int, to_str, unknown_key

log = logging.getLogger(__name__)

Parser = Callable[[Any, str], Any]
PLAIN_KINDS = ("int", "float", "bool", "str", "choice", "path")


@dataclass(frozen=True)
class From:
    """A default that is another key's value: a model's own setting over the service-wide one."""

    key: str


@dataclass(frozen=True)
class Key:
    """One config key. ``name`` is dotted, relative to its schema (or to one entry of a Table)."""

    name: str
    kind: str  # int, float, bool, str, choice, path, or a named kind with its own ``parse``
    default: Any = None  # as written in YAML; None: unset, which the service gives its own meaning
    doc: str = ""
    _: KW_ONLY
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    required: bool | str = False  # a string says what the key is, in the error
    aliases: tuple[str, ...] = ()  # other spellings, in the same section
    ignored: str = ""  # known and ignored on purpose: why (a warning at start says it)
    shown: str = ""  # the default as the reference shows it, where the service computes it
    parse: Parser | None = None

    def __post_init__(self) -> None:
        if self.parse is None and self.kind not in PLAIN_KINDS and not self.ignored:
            raise TypeError(f"{self.name}: kind {self.kind} needs a parse function")

    def convert(self, value: Any, key: str) -> Any:
        """``value`` as the service uses it; ``key`` is the dotted name the config gave it (for errors)."""
        if self.parse is not None:
            return self.parse(value, key)
        if self.kind == "int":
            return to_int(value, key, self.minimum, self.maximum)
        if self.kind == "float":
            return to_float(value, key, self.minimum, self.maximum)
        if self.kind == "bool":
            return to_bool(value, key)
        return to_str(value, key, self.choices if self.kind == "choice" else None)


# Declaring keys in one line each: integer(name, default, doc, minimum, maximum), and so on.
def integer(
    name: str, default: int | None, doc: str, minimum: int | None = None, maximum: int | None = None, **more: Any
) -> Key:
    return Key(name, "int", default, doc, minimum=minimum, maximum=maximum, **more)


def number(
    name: str, default: float | None, doc: str, minimum: float | None = None, maximum: float | None = None, **more: Any
) -> Key:
    return Key(name, "float", default, doc, minimum=minimum, maximum=maximum, **more)


def flag(name: str, default: bool | From | None, doc: str, **more: Any) -> Key:
    return Key(name, "bool", default, doc, **more)


def text(name: str, default: str | None, doc: str, **more: Any) -> Key:
    return Key(name, "str", default, doc, **more)


def choice(name: str, default: str, choices: str, doc: str = "", **more: Any) -> Key:
    """``choices``: space-separated."""
    return Key(name, "choice", default, doc, choices=tuple(choices.split()), **more)


def path(name: str, doc: str, default: str | None = None, **more: Any) -> Key:
    return Key(name, "path", default, doc, **more)


def ignored(name: str, why: str) -> Key:
    return Key(name, "any", ignored=why)


@dataclass(frozen=True)
class Table:
    """``<name>.<id>.*``: one section per id (``models.<id>.model_path``), every entry with the same keys."""

    name: str
    keys: tuple[Key, ...]
    check_id: Callable[[str], bool]
    id_error: str  # after "<name>.<id>: "


Tree = dict[str, Any]  # name -> Key | Table | Tree


def build_tree(keys: Iterable[Key | Table], where: str) -> Tree:
    tree: Tree = {}
    for item in keys:
        parts = item.name.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TypeError(f"{where}: {item.name} lies under the key {part}")
        for name in (parts[-1], *(item.aliases if isinstance(item, Key) else ())):
            if name in node:
                raise TypeError(f"{where}: {item.name} declared twice")
            node[name] = item
    return tree


def leaves(tree: Tree, prefix: str = "") -> Iterator[str]:
    for name, node in tree.items():
        dotted = join(prefix, name)
        if isinstance(node, dict):
            yield from leaves(node, dotted)
        else:
            yield dotted


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def suggestion(name: str, siblings: Tree, prefix: str, everywhere: list[str]) -> str | None:
    """The same name in another section (a key put in the wrong one), else a close sibling (a typo), else a close
    name in another section. ``everywhere``: every dotted key of the level, as the config spells them."""
    full = join(prefix, name)
    elsewhere = {
        dotted.rsplit(".", 1)[-1]: dotted for dotted in reversed(everywhere) if dotted.rpartition(".")[0] != prefix
    }
    same = [dotted for dotted in everywhere if dotted.rsplit(".", 1)[-1] == name]
    if same:
        return close_match(full, same) or same[0]
    guess = close_match(name, siblings)
    if guess:
        return join(prefix, guess)
    guess = close_match(name, elsewhere)
    return elsewhere[guess] if guess else None


class Values:
    """A validated config: each declared key's value by its dotted name, its default where not given."""

    def __init__(self, schema: KeySet, given: dict[str, tuple[Any, str]], prefix: str, root: Values | None) -> None:
        self.schema = schema
        self._given = given
        self.prefix = prefix
        self.root = root or self
        self.tables: dict[str, dict[str, Values]] = {}

    def __getitem__(self, name: str) -> Any:
        if name in self._given:
            return self._given[name][0]
        default = self.schema.keys[name].default
        if isinstance(default, From):
            return self.root[default.key]
        return self.schema.defaults.get(name)

    def given(self, name: str) -> bool:
        return name in self._given

    def given_under(self, section: str) -> bool:
        return any(name.startswith(section + ".") for name in self._given)

    def key(self, name: str) -> str:
        """The dotted name the config gave it (an alias if so), for messages."""
        if name in self._given:
            return self._given[name][1]
        return join(self.prefix, name)

    def entries(self, table: str) -> dict[str, Values]:
        return self.tables.get(table, {})


class KeySet:
    """The keys of one level (the schema's root, or one entry of a Table) and their converted defaults."""

    def __init__(self, items: Iterable[Key | Table], where: str) -> None:
        items = tuple(items)
        self.tree = build_tree(items, where)
        self.keys = {item.name: item for item in items if isinstance(item, Key)}
        self.tables = {
            item.name: (item, KeySet(item.keys, f"{where}.{item.name}")) for item in items if isinstance(item, Table)
        }
        self.defaults = {
            name: key.convert(key.default, name)
            for name, key in self.keys.items()
            if key.default is not None and not isinstance(key.default, From) and not key.ignored
        }

    def validate(self, raw: Any, prefix: str, root: Values | None) -> Values:
        given: dict[str, tuple[Any, str]] = {}
        tables: dict[str, tuple[Any, str]] = {}
        self._walk(raw, self.tree, prefix, [join(prefix, leaf) for leaf in leaves(self.tree)], given, tables)
        values = Values(self, given, prefix, root)
        for name, key in self.keys.items():
            if key.required and name not in given:
                what = f" ({key.required})" if isinstance(key.required, str) else ""
                raise ConfigError(f"{values.key(name)}: required{what}")
        for name, (entries, dotted) in tables.items():
            values.tables[name] = self._entries(name, entries, dotted, values.root)
        return values

    def _entries(self, name: str, raw: Any, dotted: str, root: Values) -> dict[str, Values]:
        table, keyset = self.tables[name]
        if not isinstance(raw, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {type(raw).__name__}")
        out: dict[str, Values] = {}
        for entry_id, spec in raw.items():
            entry_id = str(entry_id)
            if not table.check_id(entry_id):
                raise ConfigError(f"{dotted}.{entry_id}: {table.id_error}")
            out[entry_id] = keyset.validate({} if spec is None else spec, f"{dotted}.{entry_id}", root)
        return out

    def _walk(self, raw: Any, tree: Tree, prefix: str, everywhere: list[str], given: dict, tables: dict) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(raw).__name__}")
        for raw_name, value in raw.items():
            name = str(raw_name)
            dotted = join(prefix, name)
            node = tree.get(name)
            if node is None:
                raise unknown_key(dotted, suggestion(name, tree, prefix, everywhere), tree)
            if value is None:
                continue  # an empty YAML value: unset, its default applies
            if isinstance(node, Key):
                self._take(node, value, dotted, given)
            elif isinstance(node, Table):
                tables[node.name] = (value, dotted)
            else:
                self._walk(value, node, dotted, everywhere, given, tables)

    def _take(self, key: Key, value: Any, dotted: str, given: dict) -> None:
        if key.ignored:
            log.warning("config: %s is ignored (%s)", dotted, key.ignored)
            return
        if key.name in given:
            raise ConfigError(f"{given[key.name][1]} and {dotted}: two spellings of one key; give one")
        given[key.name] = (key.convert(value, dotted), dotted)


class Schema(KeySet):
    """Every key one service reads, validated in one pass: unknown keys, types, bounds and required keys."""

    def __init__(self, service: str, items: Iterable[Key | Table]) -> None:
        self.service = service
        super().__init__(items, service)

    def check(self, raw: Mapping[str, Any]) -> Values:
        return self.validate(dict(raw), "", None)

    def default(self, name: str) -> Any:
        """The converted default of ``name`` (``models.<id>.preload`` for a table's key), for dataclasses."""
        keyset, rest = self._level(name)
        return keyset.defaults.get(rest)

    def _level(self, name: str) -> tuple[KeySet, str]:
        for table, (_, keyset) in self.tables.items():
            if name.startswith(f"{table}.<id>."):
                return keyset, name[len(table) + 6 :]
        return self, name

    def names(self, dotted: str) -> bool:
        """Whether ``dotted`` (a table entry's id in its place) reaches a declared key or section."""
        node: Any = self.tree
        parts = dotted.split(".")
        while parts:
            if isinstance(node, Key):
                return True  # deeper than a key: its own value (a geometry mapping) checks the rest
            if isinstance(node, Table):
                node = self.tables[node.name][1].tree
                parts = parts[1:]  # the entry's id
                continue
            node = node.get(parts.pop(0))
            if node is None:
                return False
        return True

    def from_environment(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The environment's overrides that name this service's keys; the others are named in a warning."""
        kept = {}
        for dotted, value in overrides.items():
            if self.names(dotted):
                kept[dotted] = value
                continue
            guess = close_match(dotted, [n for n, _ in self.rows()])
            hint = f" (did you mean {env_name(guess)}?)" if guess and "<id>" not in guess else ""
            log.warning("config: %s names no key of the %s service; ignored%s", env_name(dotted), self.service, hint)
        return kept

    def rows(self) -> Iterator[tuple[str, Key]]:
        """Every key with its documented name (``models.<id>.preload``), in declaration order."""
        for name, key in self.keys.items():
            yield name, key
        for table, (_, keyset) in self.tables.items():
            for name, key in keyset.keys.items():
                yield f"{table}.<id>.{name}", key
