"""Every config key's default and meaning, for `--help`: the meanings are the comments of
config/base_config.py, read from its source so that the help cannot drift from it."""

from __future__ import annotations

import ast
import io
import math
import tokenize
from collections.abc import Callable
from typing import Any

import ml_collections

from asyncpatch_jax.config import base_config

_SOURCE = base_config.__file__

def _key_comments(function: str) -> dict[str, tuple[int, str]]:
  """{dotted key: (line, meaning)} of the keys that `function` in base_config.py sets.

  A key is set by `config.<key> = value`, by a keyword of `config.<section> = dict(...)`
  or of `config.<section>.update(...)`. Its meaning is the `# comment` that ends the
  line of its value, continued on the comment-only lines below that start in the same
  column; a comment on a line of its own above a key is a heading, not a meaning.
  """
  with open(_SOURCE, encoding="utf-8") as f:
    source = f.read()
  lines = source.splitlines()
  trailing, alone = {}, {}   # line -> (column, text) of comments after code / on their own
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      (row, col), text = tok.start, tok.string.lstrip("#").strip()
      (alone if not lines[row - 1][:col].strip() else trailing)[row] = (col, text)

  def meaning(line: int) -> str:
    if line not in trailing:
      return ""
    col, text = trailing[line]
    parts = [text]
    while alone.get(line + 1, (None,))[0] == col:
      line += 1
      parts.append(alone[line][1])
    return " ".join(parts)

  def section(target) -> str | None:   # "x" for `config.x`, else None
    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
        and target.value.id == "config"):
      return target.attr
    return None

  tree = ast.parse(source)
  body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  out = {}
  for node in ast.walk(body):
    if isinstance(node, ast.Assign) and section(node.targets[0]):
      name, value = section(node.targets[0]), node.value
      if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict"):
        out[name] = (value.end_lineno, meaning(value.end_lineno))
        continue
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "update" and section(node.func.value)):
      name, value = section(node.func.value), node
    else:
      continue
    for kw in value.keywords:
      out[f"{name}.{kw.arg}"] = (kw.value.end_lineno, meaning(kw.value.end_lineno))
  return out


def describe_keys(make: Callable[[], ml_collections.ConfigDict] = base_config.get_base_config,
                  ) -> list[tuple[str, Any, str]]:
  """(key, default, meaning) of every key of the config `make()` builds, in this file's order.

  `make` is get_base_config or get_autoencoder_base_config. The keys and defaults are
  the built config's; the meaning of each is its comment in this file (`_key_comments`:
  the one in `make`, else the one in get_base_config, whose sections the autoencoder
  config copies), so `--help` cannot drift from the source. A key without a comment gets
  "" (tests/test_help.py requires one for every key). An empty free-form dict (data.options)
  is one key with the default {}.
  """
  base = _key_comments(base_config.get_base_config.__name__)
  own = _key_comments(make.__name__)
  rows = []

  def walk(config: ml_collections.ConfigDict, prefix: str) -> None:
    for name, value in config.items():
      key = prefix + name
      if isinstance(value, ml_collections.ConfigDict) and list(value.keys()):
        walk(value, key + ".")
        continue
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      line = base[key][0] if key in base else own.get(key, (math.inf, ""))[0]
      meaning = own.get(key, (0, ""))[1] or base.get(key, (0, ""))[1]
      rows.append((line, key, value, meaning))

  walk(make(), "")
  return [row[1:] for row in sorted(rows, key=lambda row: row[0])]
