"""HBM traffic of a compiled TPU program, from its optimised HLO and XLA's byte count.

XLA:TPU's ``cost_analysis()["bytes accessed"]`` adds up, instruction by instruction, the bytes
of each operand and result, whatever memory they live in. After memory-space assignment many
arrays live in on-chip VMEM (layouts marked ``S(1)``; ``S(2)`` is SMEM): an async copy
prefetches them from HBM and its start and done halves each count a read and a write. An array
prefetched once and read once is counted five times, of which one read touches HBM. On a v5e
ViT-B step that is about 40% of the bytes XLA reports (bench/README).

:func:`onchip_bytes` re-applies XLA's per-instruction accounting to the executable's HLO text
(``compiled.as_text()``) and returns the part that touches no HBM: operands and results of
top-level instructions that live in another memory space, the on-chip side of ``copy-start``,
and the whole of ``copy-done``. :func:`hbm_traffic` is ``bytes accessed`` minus that. What the
accounting was checked against (tests/test_hbm_traffic.py): a prefetched matmul, where the
result is exactly the bytes of its operands and result. Everything else stays counted as HBM
traffic (the done halves of sliced prefetches and collectives, instructions this parser does
not read), so the result is an upper bound that errs towards more traffic, and equals ``bytes
accessed`` for a program without on-chip arrays.
"""
from __future__ import annotations

import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
# One array shape with its optional layout, e.g. bf16[32,160,768]{2,1,0:T(8,128)(2,1)S(1)}.
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
# Computations XLA's cost analysis walks into (fusion bodies are costed as their fusion).
_CALLED = re.compile(r"(?:branch_computations=\{([^}]*)\}|(?:body|condition|to_apply|"
                     r"true_computation|false_computation)=%?([\w.\-]+))")
# No memory traffic of their own, or costed through the computations they call.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
               "partition-id", "replica-id", "conditional", "while", "call", "opt-barrier",
               "add-dependency"}


def _arrays(shape: str) -> list[tuple[int, int]]:
  """(bytes, memory space) of every array in a (tuple) shape string."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    space = _MEMORY_SPACE.search(layout or "")
    out.append((n * _DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
  return out


def _onchip(shape: str) -> int:
  return sum(b for b, space in _arrays(shape) if space != 0)


def _total(shape: str) -> int:
  return sum(b for b, _ in _arrays(shape))


def _split_top(s: str) -> list[str]:
  """Splits a tuple's element list at top-level commas."""
  parts, depth, cur = [], 0, []
  for ch in s:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if "".join(cur).strip():
    parts.append("".join(cur))
  return parts


def _parse_instruction(line: str):
  """(name, shape, opcode, operand names, attributes) of one HLO instruction line."""
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):  # tuple shape
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  m = re.match(r"([\w\-]+)\((.*)$", rest)
  if not m:
    return None
  opcode, rest = m.group(1), m.group(2)
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += rest[i] == "("
    depth -= rest[i] == ")"
    i += 1
  return name, shape, opcode, re.findall(r"%([\w.\-]+)", rest[:i - 1]), rest[i:]


def _top_level_instructions(hlo_text: str) -> tuple[list, dict[str, str]]:
  """The instructions XLA's cost analysis counts (entry computation and the computations of
  its control flow, not fusion bodies), and every instruction's shape by name."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = m.group(2)
      computations[current] = []
      entry = current if m.group(1) else entry
    elif current is not None and line.startswith("  "):
      computations[current].append(line)
  parsed = {c: [p for p in map(_parse_instruction, lines) if p] for c, lines in computations.items()}
  shapes = {p[0]: p[1] for instrs in parsed.values() for p in instrs}
  out, todo, seen = [], [entry] if entry else [], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in parsed:
      continue
    seen.add(name)
    for instr in parsed[name]:
      out.append(instr)
      if instr[2] in ("conditional", "while", "call"):
        for group, single in _CALLED.findall(instr[4]):
          todo.extend(c.strip().lstrip("%") for c in (group.split(",") if group else [single]))
  return out, shapes


def onchip_bytes(hlo_text: str) -> int:
  """The bytes of XLA's ``bytes accessed`` that touch no HBM (see the module docstring)."""
  instructions, shapes = _top_level_instructions(hlo_text)
  total = 0
  for _, shape, opcode, operands, _ in instructions:
    if opcode in _NO_TRAFFIC:
      continue
    if opcode == "copy-start":
      # Counted as the source read plus the destination (the tuple's first element) written.
      elements = _split_top(shape.strip()[1:-1]) if shape.startswith("(") else [shape]
      total += _onchip(elements[0]) + sum(_onchip(shapes.get(o, "")) for o in operands)
    elif opcode == "copy-done":
      # Counted as the destination read and written again: a wait, no traffic of its own.
      total += 2 * _total(shape)
    elif opcode.endswith("-start") or opcode.endswith("-done"):
      continue  # sliced prefetches, collectives: not checked, left in as HBM traffic
    else:
      total += _onchip(shape) + sum(_onchip(shapes.get(o, "")) for o in operands)
  return total


def hbm_traffic(hlo_text: str, bytes_accessed: float) -> float:
  """``bytes_accessed`` (XLA's cost analysis of the program ``hlo_text`` describes) less its
  on-chip part: an upper bound on the program's HBM reads and writes."""
  return max(float(bytes_accessed) - onchip_bytes(hlo_text), 0.0)
