"""Chunking: definition chunks per language, exact spans, full coverage, windows elsewhere."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repomem.core.chunking as chunking
from repomem.core.chunking import Chunk, chunk_text, estimate_tokens, source_lines
from repomem.core.walk import language_for, walk_repo

REPO = Path(__file__).resolve().parents[1]


def check_invariants(text: str, chunks: list[Chunk], max_tokens: int | None = None) -> None:
    """The promises of chunk_text: exact spans, every non-blank line covered, no blank chunk."""
    lines = source_lines(text)
    covered = [False] * len(lines)
    for c in chunks:
        assert 1 <= c.start_line <= c.end_line <= len(lines), c
        assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line]), c
        assert c.text.strip(), c
        assert c.kind in chunking.CHUNK_KINDS
        for r in range(c.start_line - 1, c.end_line):
            covered[r] = True
        if max_tokens is not None and c.start_line != c.end_line:
            assert estimate_tokens(c.text) <= max_tokens, c
    missing = [i + 1 for i, (cov, ln) in enumerate(zip(covered, lines, strict=True)) if not cov and ln.strip()]
    assert not missing, f"uncovered lines {missing[:10]}"


def table(chunks: list[Chunk]) -> list[tuple[str | None, str, int, int]]:
    return [(c.symbol, c.kind, c.start_line, c.end_line) for c in chunks]


def chunks_of(src: str, language: str, **kw) -> list[Chunk]:
    src = textwrap.dedent(src).lstrip("\n")
    out = chunk_text(f"x.{language}", src, language, **kw)
    check_invariants(src, out)
    return out


# ---- per language ----------------------------------------------------------------------------


PY = '''
"""Module doc."""
import os
DEFAULT_POOLSIZE = 10


# helper comment
@decorator
def helper(a, b):
    """Add."""
    return a + b


class Pool:
    """A pool."""

    size = 3

    def __init__(self):
        self.items = []

    @property
    def count(self):
        return len(self.items)


if __name__ == "__main__":
    helper(1, 2)
'''


def test_python_small_definitions() -> None:
    got = chunks_of(PY, "python")
    assert table(got) == [
        ("DEFAULT_POOLSIZE", "module", 1, 3),
        ("helper", "function", 6, 10),  # leading comment and decorator attached
        ("Pool", "class", 13, 23),
        (None, "module", 26, 27),
    ]
    assert got[1].text.startswith("# helper comment\n@decorator\ndef helper")


def test_python_big_class_splits_into_header_and_methods() -> None:
    got = chunks_of(PY, "python", max_tokens=30)
    assert table(got)[2:] == [
        ("Pool", "class", 13, 16),  # class line, docstring, class-level statements
        ("Pool.__init__", "method", 18, 19),
        ("Pool.count", "method", 21, 23),  # with its decorator
        (None, "module", 26, 27),
    ]
    assert got[2].text.startswith("class Pool:")
    assert got[4].text.startswith("    @property")


def test_python_oversized_function_windows() -> None:
    body = "\n".join(f"    value_{i} = compute_something({i}, {i} * 2)" for i in range(60))
    src = f"def big():\n{body}\n    return value_0\n"
    got = chunk_text("big.py", src, "python", max_tokens=100)
    check_invariants(src, got, max_tokens=100)
    assert len(got) > 3
    assert all(c.kind == "window" for c in got)
    assert [c.symbol for c in got] == [f"big#part{i}" for i in range(1, len(got) + 1)]
    assert got[0].start_line == 1 and got[-1].end_line == 62


def test_python_nested_class_and_assignment_groups() -> None:
    src = """
    A, B = 1, 2
    C: int = 3
    x = y = 4

    class Outer:
        class Inner:
            def m(self):
                return 1

            def n(self):
                return 2
    """
    got = chunks_of(src, "python", max_tokens=12)
    syms = [c.symbol for c in got]
    assert syms[0] == "A,B,C,x,y"
    assert "Outer.Inner.m" in syms and "Outer.Inner.n" in syms
    kinds = {c.symbol: c.kind for c in got}
    assert kinds["Outer.Inner.m"] == "method"


JS = """
import { x } from "./x.js";
export const API_URL = "http://localhost";

/** Adds. */
export function add(a, b) {
  return a + b;
}

const handler = async (event) => {
  return event;
};

class Counter extends Base {
  count = 0;

  increment() {
    this.count += 1;
  }

  static create() {
    return new Counter();
  }
}

Counter.prototype.reset = function () {
  this.count = 0;
};
"""


def test_javascript() -> None:
    got = chunks_of(JS, "javascript")
    assert table(got) == [
        ("API_URL", "module", 1, 2),
        ("add", "function", 4, 7),
        ("handler", "function", 9, 11),
        ("Counter", "class", 13, 23),
        ("Counter.prototype.reset", "function", 25, 27),
    ]
    small = chunks_of(JS, "javascript", max_tokens=15)
    syms = [c.symbol for c in small]
    assert "Counter.increment" in syms and "Counter.create" in syms


def test_typescript_overload_signatures_go_with_their_implementation() -> None:
    src = (
        'import { x } from "./x";\n\n'
        "/** Parses. */\n"
        "export function parse(a: string): number;\n"
        "export function parse(a: number): number;\n"
        "export function parse(a: any): number {\n  return Number(a);\n}\n\n"
        "function local(a: string): void;\n"
        "function local(a: any) {\n  return a;\n}\n\n"
        "export function declared(a: string): void;\n"  # no implementation (a declaration file): left alone
        "function other() {\n  return 1;\n}\n"
    )
    assert table(chunks_of(src, "typescript")) == [
        (None, "module", 1, 1),
        ("parse", "function", 3, 8),
        ("local", "function", 10, 13),
        (None, "module", 15, 15),
        ("other", "function", 16, 18),
    ]


@pytest.mark.parametrize("language", ["javascript", "typescript"])
def test_anonymous_default_exports_are_named_default(language: str) -> None:
    """What an importer calls `default` is a definition of its own, not part of the module's lead."""
    src = (
        'import x from "./x.js";\n\n'
        "export default function (opts) {\n  return opts.a + 1;\n}\n\n"
        "export default () => 2;\n\n"
        "export default class {\n  run() {\n    return 1;\n  }\n}\n\n"
        "export default x;\n"
    )
    assert table(chunks_of(src, language)) == [
        (None, "module", 1, 1),
        ("default", "function", 3, 5),
        ("default", "function", 7, 7),
        ("default", "class", 9, 13),
        (None, "module", 15, 15),
    ]


TS = """
export interface Shape {
  area(): number;
}

export type Id = string | number;

export enum Color { Red, Green }

export abstract class Base<T> implements Shape {
  protected items: T[] = [];

  abstract area(): number;

  describe(): string {
    return `items: ${this.items.length}`;
  }
}

namespace Geometry {
  export function distance(a: number, b: number): number {
    return Math.abs(a - b);
  }
}
"""


def test_typescript() -> None:
    got = chunks_of(TS, "typescript")
    assert table(got) == [
        ("Shape", "class", 1, 3),
        ("Id", "class", 5, 5),
        ("Color", "class", 7, 7),
        ("Base", "class", 9, 17),
        ("Geometry", "module", 19, 23),
    ]
    small = chunks_of(TS, "typescript", max_tokens=30)
    syms = [c.symbol for c in small]
    assert "Base.describe" in syms
    assert "Geometry.distance" in syms  # namespace members are prefixed


def test_tsx() -> None:
    src = """
    import React from "react";

    export function Button({ label }: { label: string }) {
      return <button className="btn">{label}</button>;
    }

    export const Card = ({ title }: Props) => <div>{title}</div>;
    """
    got = chunks_of(src, "tsx")
    assert [(c.symbol, c.kind) for c in got] == [(None, "module"), ("Button", "function"), ("Card", "function")]


GO = """
package main

import "fmt"

// Server serves.
type Server struct {
	addr string
}

const MaxConns = 10

func (s *Server) Start(port int) error {
	fmt.Println(s.addr, port)
	return nil
}

func (s Server) Addr() string { return s.addr }

func main() {
	s := &Server{}
	s.Start(80)
}
"""


def test_go() -> None:
    got = chunks_of(GO, "go")
    assert table(got) == [
        (None, "module", 1, 3),
        ("Server", "class", 5, 8),
        ("MaxConns", "module", 10, 10),
        ("Server.Start", "method", 12, 15),
        ("Server.Addr", "method", 17, 17),
        ("main", "function", 19, 22),
    ]


RUST = """
use std::fmt;

/// A point.
#[derive(Debug, Clone)]
pub struct Point {
    x: i32,
    y: i32,
}

impl Point {
    pub fn new(x: i32, y: i32) -> Self {
        Point { x, y }
    }

    pub fn norm(&self) -> f64 {
        ((self.x * self.x + self.y * self.y) as f64).sqrt()
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "({}, {})", self.x, self.y)
    }
}

const ORIGIN: Point = Point { x: 0, y: 0 };
"""


def test_rust() -> None:
    got = chunks_of(RUST, "rust")
    assert table(got) == [
        (None, "module", 1, 1),
        ("Point", "class", 3, 8),  # doc comment and attribute attached
        ("Point", "class", 10, 18),
        ("Point", "class", 20, 24),
        ("ORIGIN", "module", 26, 26),
    ]
    small = chunks_of(RUST, "rust", max_tokens=35)
    syms = [(c.symbol, c.kind) for c in small]
    assert ("Point.new", "method") in syms and ("Point.norm", "method") in syms and ("Point.fmt", "method") in syms


JAVA = """
package com.example;

import java.util.List;

/** A greeter. */
@Service
public class Greeter {
    private final String name;

    public Greeter(String name) {
        this.name = name;
    }

    @Override
    public String toString() {
        return "Greeter " + name;
    }

    enum Mode { LOUD, QUIET }
}
"""


def test_java() -> None:
    got = chunks_of(JAVA, "java")
    assert table(got) == [(None, "module", 1, 3), ("Greeter", "class", 5, 20)]
    small = chunks_of(JAVA, "java", max_tokens=28)
    assert table(small) == [
        (None, "module", 1, 3),
        ("Greeter", "class", 5, 8),
        ("Greeter.Greeter", "method", 10, 12),
        ("Greeter.toString", "method", 14, 17),
        ("Greeter.Mode", "class", 19, 20),  # the class's closing brace folds into the last member
    ]


C = """
#include <stdio.h>
#define MAX_ITEMS 64

struct item {
    int id;
    const char *name;
};

typedef struct {
    int x, y;
} point_t;

static int counter = 0;

/* Print one item. */
static void print_item(const struct item *it) {
    printf("%d %s\\n", it->id, it->name);
}

#ifdef DEBUG
void debug_dump(void) {
    printf("%d\\n", counter);
}
#endif
"""


def test_c() -> None:
    got = chunks_of(C, "c")
    assert table(got) == [
        ("MAX_ITEMS", "module", 1, 2),
        ("item", "class", 4, 7),
        ("point_t", "class", 9, 11),
        ("counter", "module", 13, 13),
        ("print_item", "function", 15, 18),
        ("debug_dump", "module", 20, 24),  # a scope kept whole is named by the definitions in it
    ]
    small = chunks_of(C, "c", max_tokens=20)
    assert ("debug_dump", "function") in [(c.symbol, c.kind) for c in small]


CPP = """
#include <vector>

namespace geo {

class Shape {
 public:
  virtual ~Shape() = default;
  virtual double area() const = 0;
};

class Square : public Shape {
 public:
  explicit Square(double s) : side_(s) {}
  double area() const override { return side_ * side_; }

 private:
  double side_;
};

template <typename T>
T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace geo

double geo::Circle::area() const {
  return 3.14159 * r_ * r_;
}
"""


def test_cpp() -> None:
    got = chunks_of(CPP, "cpp", max_tokens=40)
    syms = [(c.symbol, c.kind) for c in got]
    assert ("geo.Shape", "class") in syms
    assert ("geo.Square.area", "method") in syms or ("geo.Square", "class") in syms
    assert ("geo.clamp", "function") in syms
    assert ("geo.Circle.area", "method") in syms
    small = chunks_of(CPP, "cpp", max_tokens=20)
    assert ("geo.Square.Square", "method") in [(c.symbol, c.kind) for c in small]


# ---- damaged and unusual code -------------------------------------------------------------------


def _table_of(src: str, language: str, **kw) -> list[tuple[str | None, str, int, int]]:
    got = chunk_text(f"x.{language}", src, language, **kw)
    check_invariants(src, got, max_tokens=kw.get("max_tokens"))
    return table(got)


def test_a_definition_starting_on_the_row_another_ends_keeps_its_own_chunks() -> None:
    body = "".join(f"  total += compute(value{i}, other{i});\n" for i in range(60))
    got = _table_of("function small() { return 1 } function big() {\n" + body + "}\n", "javascript", max_tokens=120)
    assert got[0] == ("small", "function", 1, 1)  # the shared row stays with the first
    assert {sym for sym, *_ in got[1:]} >= {"big#part1", "big#part2"} and got[-1][3] == 62
    # one-liners that fit together still merge
    assert _table_of("function a() { return 1 } function b() { return 2 }\n", "javascript") == \
        [("a", "function", 1, 1)]


def _py_fn(name: str, lines: int = 12) -> str:
    body = "".join(f"    x = x * {i} + helper_{i}(x)\n" for i in range(lines))
    return f"def {name}(x):\n{body}    return x\n\n\n"


def _c_fn(name: str) -> str:
    body = "".join(f"    a = a * {i} + {i};\n" for i in range(8))
    return f"int {name}(int a)\n{{\n{body}    return a;\n}}\n\n"


def _js_handler(name: str) -> str:
    return f"  handle{name} = (event) => {{\n    this.setState({{ v: event.target.value }});\n  }};\n\n"


def _indent(text: str) -> str:
    return "".join(f"    {ln}\n" if ln else "\n" for ln in text.split("\n"))


def test_a_python_syntax_error_does_not_give_the_next_definitions_its_name() -> None:
    broken = "import os\n\n\ndef broken(a, b:\n    return a\n\n\n"
    src = broken + _py_fn("alpha") + _py_fn("beta") + "class Gamma:\n    pass\n"
    got = _table_of(src, "python", max_tokens=80)
    named = " ".join(sym or "" for sym, *_ in got)
    assert "broken#" not in named and "alpha" in named and "beta" in named
    assert ("Gamma", "class", 40, 41) in got


def test_definitions_inside_c_text_the_grammar_could_not_place_keep_their_names() -> None:
    split = "#ifdef WIN32\nint split(int a) {\n#else\nint split(long a) {\n#endif\n    return a;\n}\n\n"
    src = "#include <stdio.h>\n\n" + _c_fn("alpha") + split + _c_fn("beta") + _c_fn("gamma")
    names = {sym for sym, *_ in _table_of(src, "c", max_tokens=60)}
    assert {"alpha", "beta", "gamma"} <= names


def test_class_fields_holding_functions_are_methods() -> None:
    rest = "  state = { a: 1 };\n  render() {\n    return null;\n  }\n}\n"
    src = "class Form {\n" + _js_handler("Change") + _js_handler("Submit") + rest
    got = _table_of(src, "javascript", max_tokens=25)
    assert ("Form.handleChange", "method", 2, 4) in got and ("Form.handleSubmit", "method", 6, 8) in got
    ts = src.replace("  handle", "  private handle").replace("(event) =>", "(event: Event): void =>")
    assert ("Form.handleSubmit", "method", 6, 8) in _table_of(ts, "typescript", max_tokens=40)


def test_python_definitions_under_module_if_and_try_keep_their_names() -> None:
    src = ("import sys\n\nif sys.platform == 'win32':\n" + _indent(_py_fn("open_win") + _py_fn("close_win"))
           + "else:\n" + _indent(_py_fn("open_posix")) + "try:\n    import simplejson as json\nexcept ImportError:\n"
           "    import json\n")
    got = _table_of(src, "python", max_tokens=150)
    assert ("open_win", "function", 3, 17) in got  # the branch header goes with the definition it guards
    assert {"close_win", "open_posix"} <= {sym for sym, *_ in got}
    small = "if WIN:\n    def f():\n        return 1\nelse:\n    def f():\n        return 2\n"
    assert _table_of(small, "python") == [("f", "module", 1, 6)]  # kept whole: named by what it defines


def test_a_long_comment_block_above_a_definition_is_not_part_of_it() -> None:
    src = "import os\n" + "".join(f"# old_code_{i}()\n" for i in range(200)) + "# Explain f.\ndef f():\n    pass\n"
    got = _table_of(src, "python", max_tokens=100)
    f = [row for row in got if row[0] == "f"]
    assert len(f) == 1 and f[0][3] == 204 and f[0][2] > 150  # its own comments, not the 200 lines above
    assert _table_of("import os\n\n# Explain f.\ndef f():\n    pass\n", "python")[-1] == ("f", "function", 3, 5)


def test_a_heading_padded_with_spaces_is_read_in_linear_time() -> None:
    import time

    t0 = time.perf_counter()
    got = chunk_text("a.md", "# Results" + " " * 4000 + "|\n\nbody\n", "markdown")
    assert time.perf_counter() - t0 < 1.0
    assert got[0].symbol.startswith("Results")
    titles = {h: chunking._heading_title(h) for h in ("# Title", "## Title ##", "#Title", "### C#", "# a #b", "#")}
    assert titles == {"# Title": "Title", "## Title ##": "Title", "#Title": None, "### C#": "C#", "# a #b": "a #b",
                      "#": None}


def test_a_fence_closes_only_on_its_own_marker() -> None:
    lines = ["# Intro", "text", "~~~~markdown", "```python", "# not a heading", "```", "~~~~", "more",
             "## Real", "real text"]
    src = "\n".join(lines) + "\n"
    prefer, under = chunking._markdown_marks(src.split("\n"))
    assert prefer == {0, 8} and under[4] == "Intro" and under[9] == "Real"


# ---- windows ---------------------------------------------------------------------------------


def test_markdown_prefers_headings() -> None:
    sections = []
    for i in range(6):
        sections.append(f"## Section {i}\n\n" + "\n".join(f"Sentence {i}.{j} about things." for j in range(12)))
    src = "# Title\n\nIntro.\n\n" + "\n\n".join(sections) + "\n"
    got = chunk_text("README.md", src, "markdown", max_tokens=80)
    check_invariants(src, got, max_tokens=80)
    assert all(c.kind == "window" for c in got)
    heading_starts = [c for c in got if c.text.startswith("## ")]
    assert len(heading_starts) >= 4  # cuts fall on headings
    assert any(c.symbol == "Section 3" for c in got)


def test_plain_windows_overlap_and_budget() -> None:
    src = "\n".join(f"line {i} " + "word " * 3 for i in range(200)) + "\n"
    got = chunk_text("notes.txt", src, None)
    check_invariants(src, got, max_tokens=384)
    assert all(c.end_line - c.start_line + 1 <= chunking.WINDOW_LINES for c in got)
    # hard cuts (no blank line, no heading) overlap
    assert any(b.start_line <= a.end_line for a, b in zip(got, got[1:], strict=False))


def test_config_windows_prefer_sections() -> None:
    src = "\n".join(f"[section{i}]\n" + "\n".join(f"key{j} = {j}" for j in range(8)) for i in range(10)) + "\n"
    got = chunk_text("conf.toml", src, "toml", max_tokens=60)
    check_invariants(src, got, max_tokens=60)
    assert sum(c.text.startswith("[section") for c in got) >= len(got) - 1


def test_empty_and_blank_files() -> None:
    assert chunk_text("a.py", "", "python") == []
    assert chunk_text("a.py", "\n\n   \n", "python") == []
    assert chunk_text("a.txt", " \n", None) == []


def test_parser_failure_falls_back_to_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(language: str, data: bytes):
        raise RuntimeError("grammar mismatch")

    monkeypatch.setattr(chunking, "_parse", boom)
    src = textwrap.dedent(PY).lstrip("\n")
    got = chunk_text("x.py", src, "python")
    check_invariants(src, got)
    assert all(c.kind == "window" for c in got)


def test_syntax_errors_still_cover_everything() -> None:
    src = "def ok():\n    return 1\n\ndef broken(:\n    pass\n\nclass K:\n    def m(self):\n        return 2\n"
    got = chunk_text("x.py", src, "python", max_tokens=10)
    check_invariants(src, got)
    assert "ok" in [c.symbol for c in got]


def test_content_hash_is_of_text_only() -> None:
    a = Chunk("a.py", "python", "f", "function", 1, 2, "def f():\n    pass")
    b = Chunk("b.py", "python", "g", "function", 10, 11, "def f():\n    pass")
    assert a.content_hash == b.content_hash
    import hashlib

    assert a.content_hash == hashlib.sha256(a.text.encode()).hexdigest()


def test_grammars_available() -> None:
    for lang in ["python", "javascript", "typescript", "tsx", "go", "rust", "java", "c", "cpp"]:
        assert lang in chunking._SPECS  # definition-level chunks
        chunking._language(lang)  # the wheel loads
    assert "markdown" not in chunking._SPECS  # line windows


# ---- properties ------------------------------------------------------------------------------


_LINES = st.sampled_from(
    [
        "",
        "   ",
        "def f(x):",
        "    return x",
        "class A:",
        "    def m(self):",
        "        pass",
        "x = 1",
        "# comment",
        "@dec",
        "import os",
        "}",
        "{",
        "function g() {",
        "  return 1;",
        "int main() {",
        "fn main() {",
        "type T struct {",
        "#ifdef X",
        "#endif",
        "/* c */",
        "é ü 漢字",
        "\t\tdeep",
        "    " + "long " * 60,
        "## Heading",
        "```",
        "[section]",
        "key = value",
    ]
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_LINES, min_size=0, max_size=80),
    language=st.sampled_from(
        ["python", "javascript", "typescript", "go", "rust", "java", "c", "cpp", "markdown", "toml", None]
    ),
    max_tokens=st.sampled_from([1, 8, 40, 384]),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
def test_property_generated(lines, language, max_tokens, crlf, final_newline) -> None:
    text = ("\r\n" if crlf else "\n").join(lines) + ("\n" if final_newline and lines else "")
    got = chunk_text("gen", text, language, max_tokens=max_tokens)
    check_invariants(text, got, max_tokens=max_tokens)


def test_property_over_this_repository(caplog: pytest.LogCaptureFixture) -> None:
    res = walk_repo(REPO)
    n = 0
    for f in res.files:
        for max_tokens in (384, 48):
            got = chunk_text(f.rel, f.text, f.language, max_tokens=max_tokens)
            check_invariants(f.text, got, max_tokens=max_tokens)
            n += len(got)
    assert n > 0
    assert "using windows" not in caplog.text  # definition chunks held up; no fallback needed


def test_property_over_installed_sources() -> None:
    """Real code in several languages: whatever grammar-bearing files the environment has."""
    import sys

    roots = [Path(p) for p in sys.path if p.endswith("site-packages")]
    seen: dict[str, int] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            lang = language_for(path.name)
            if lang not in chunking._SPECS or seen.get(lang, 0) >= 25 or not path.is_file():
                continue
            try:
                if path.stat().st_size > 150_000:
                    continue
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            seen[lang] = seen.get(lang, 0) + 1
            for max_tokens in (384, 64):
                check_invariants(text, chunk_text(str(path), text, lang, max_tokens=max_tokens), max_tokens=max_tokens)
            if len(seen) >= 4 and all(v >= 25 for v in seen.values()):
                break
    assert seen.get("python", 0) >= 1
