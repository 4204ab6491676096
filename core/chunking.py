"""Split one source file into chunks: the unit that becomes a MemCube.

Why definition-level chunks: a memory chunk is compiled alone (its own KV fragment) and retrieved
by name, so it should be one thing a developer would ask about (a function, a method, a class)
and carry that thing's dotted symbol. Everything between definitions (imports, constants, the
`if __name__ == "__main__":` block) becomes `module` chunks so nothing in the file is lost.

Rules every result obeys (tests check them on real files):

* spans are exact: `chunk.text == "\\n".join(lines[start_line - 1:end_line])` with
  `lines = source_lines(text)` (1-based, inclusive);
* every non-blank line is covered by at least one chunk (blank lines between chunks may be left
  out so that a definition's span is the definition, not its surrounding whitespace);
* no chunk is blank, and every chunk fits `max_tokens` unless it is a single line that does not.

Languages with a tree-sitter grammar wheel get definition chunks; Markdown, config files and
anything else get line windows (40 lines, 8 overlap, preferring headings / sections / blank-line
boundaries). A parser failure never raises: the file falls back to windows. Code with a syntax error (a
file half typed while the watcher reads it) keeps the names of the definitions the grammar could still
place, and a definition never takes the name of another that an error made it swallow.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

CHUNK_KINDS = ("function", "method", "class", "module", "window")
# Raised whenever the same file would chunk differently: memories chunked by an older version are re-chunked
# at the next index, although their files did not change.
CHUNKING_VERSION = 3

WINDOW_LINES = 40
WINDOW_OVERLAP = 8
# Oversized definitions are cut into windows of at most this many lines (tokens usually bind first).
CODE_WINDOW_LINES = 120
# Group symbols name at most this many assigned names ("A,B,C"): enough to be found by name.
MAX_SYMBOL_NAMES = 8


def estimate_tokens(text: str) -> int:
    """Cheap token estimate (about 3.5 characters per token for code): no tokenizer needed."""
    return int(round(len(text) / 3.5))


def source_lines(text: str) -> list[str]:
    """The file's lines as chunk spans count them: split on "\\n" only (as tree-sitter rows do).

    A final newline does not start an extra line, so `"a\\nb\\n"` has two lines.
    """
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


@dataclass(frozen=True)
class Chunk:
    """One chunk of one file.

    `content_hash` hashes the text only (not path or line numbers): a definition that merely moved
    keeps its hash, so the store can keep its compiled payload; identity (path, symbol, kind) is
    the store's business.
    """

    path: str
    language: str | None
    symbol: str | None
    kind: str
    start_line: int
    end_line: int
    text: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------------------------
# Per-language grammar tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Node type names of one grammar. The shapes are the same across languages; names are not."""

    functions: frozenset[str] = frozenset()
    # class-like definitions that are never split into members (structs, enums, type aliases)
    classes: frozenset[str] = frozenset()
    # class-like definitions whose members become chunks when the whole is too big: type -> body field
    containers: dict[str, str] = field(default_factory=dict)
    # namespaces, preprocessor conditionals, `extern "C"`: recursed into when too big
    # type -> body field ("" = the node's own named children)
    scopes: dict[str, str] = field(default_factory=dict)
    # wrappers whose inner node is the definition (decorators, export, template): type -> field ("" = search)
    wrappers: dict[str, str] = field(default_factory=dict)
    # leading nodes attached to the definition below them (comments, attributes)
    attach: frozenset[str] = frozenset()
    # member lists nested in a body that should be flattened (Java enum_body_declarations, Python branches)
    flatten: frozenset[str] = frozenset()


_C_ATTACH = frozenset({"comment"})
_C_SCOPES = {
    "preproc_ifdef": "",
    "preproc_if": "",
    "preproc_else": "",
    "preproc_elif": "",
    "preproc_elifdef": "",
}

_SPECS: dict[str, _Spec] = {
    "python": _Spec(
        functions=frozenset({"function_definition"}),
        containers={"class_definition": "body"},
        # `if sys.platform == ...:` / `try: ... except ImportError:` blocks of definitions
        scopes={"if_statement": "", "try_statement": ""},
        wrappers={"decorated_definition": "definition"},
        attach=frozenset({"comment"}),
        flatten=frozenset({"block", "else_clause", "elif_clause", "except_clause", "finally_clause"}),
    ),
    "javascript": _Spec(
        functions=frozenset({"function_declaration", "generator_function_declaration", "method_definition"}),
        containers={"class_declaration": "body", "class": "body"},
        wrappers={"export_statement": ""},
        attach=frozenset({"comment"}),
    ),
    "typescript": _Spec(
        functions=frozenset({"function_declaration", "generator_function_declaration", "method_definition"}),
        classes=frozenset({"type_alias_declaration", "enum_declaration"}),
        containers={
            "class_declaration": "body",
            "abstract_class_declaration": "body",
            "interface_declaration": "body",
            "class": "body",
        },
        scopes={"internal_module": "body", "module": "body"},
        wrappers={"export_statement": ""},
        attach=frozenset({"comment"}),
    ),
    "go": _Spec(
        functions=frozenset({"function_declaration", "method_declaration"}),
        classes=frozenset({"type_declaration"}),
        attach=frozenset({"comment"}),
    ),
    "rust": _Spec(
        functions=frozenset({"function_item", "macro_definition"}),
        classes=frozenset({"struct_item", "enum_item", "union_item", "type_item"}),
        containers={"impl_item": "body", "trait_item": "body"},
        scopes={"mod_item": "body", "foreign_mod_item": "body"},
        attach=frozenset({"line_comment", "block_comment", "attribute_item"}),
    ),
    "java": _Spec(
        functions=frozenset({"method_declaration", "constructor_declaration", "compact_constructor_declaration"}),
        containers={
            "class_declaration": "body",
            "interface_declaration": "body",
            "enum_declaration": "body",
            "record_declaration": "body",
            "annotation_type_declaration": "body",
        },
        attach=frozenset({"line_comment", "block_comment"}),
        flatten=frozenset({"enum_body_declarations"}),
    ),
    "c": _Spec(
        functions=frozenset({"function_definition"}),
        classes=frozenset({"struct_specifier", "union_specifier", "enum_specifier", "type_definition"}),
        scopes=dict(_C_SCOPES),
        attach=_C_ATTACH,
    ),
    "cpp": _Spec(
        functions=frozenset({"function_definition"}),
        classes=frozenset({"enum_specifier", "type_definition", "alias_declaration"}),
        containers={"class_specifier": "body", "struct_specifier": "body", "union_specifier": "body"},
        scopes={**_C_SCOPES, "namespace_definition": "body", "linkage_specification": "body"},
        wrappers={"template_declaration": ""},
        attach=_C_ATTACH,
    ),
}
_SPECS["tsx"] = _SPECS["typescript"]


def _load_language(language: str) -> Any:
    """The grammar capsule of one language (import only when a file of that language shows up)."""
    if language == "python":
        import tree_sitter_python as m

        return m.language()
    if language == "javascript":
        import tree_sitter_javascript as m

        return m.language()
    if language in ("typescript", "tsx"):
        import tree_sitter_typescript as m

        return m.language_tsx() if language == "tsx" else m.language_typescript()
    if language == "go":
        import tree_sitter_go as m

        return m.language()
    if language == "rust":
        import tree_sitter_rust as m

        return m.language()
    if language == "java":
        import tree_sitter_java as m

        return m.language()
    if language == "c":
        import tree_sitter_c as m

        return m.language()
    if language == "cpp":
        import tree_sitter_cpp as m

        return m.language()
    raise KeyError(language)


@cache
def _language(language: str) -> Any:
    from tree_sitter import Language

    return Language(_load_language(language))


def _parse(language: str, data: bytes) -> Any:
    """Parse with a fresh Parser: parsers are not thread-safe and cost microseconds to make."""
    from tree_sitter import Parser

    return Parser(_language(language)).parse(data)


# --------------------------------------------------------------------------------------------
# Small node helpers
# --------------------------------------------------------------------------------------------


def _first_row(node: Any) -> int:
    return node.start_point[0]


def _last_row(node: Any) -> int:
    """Last row a node really occupies: a node ending at column 0 ends with the previous newline."""
    row, col = node.end_point
    if col == 0 and row > node.start_point[0]:
        return row - 1
    return row


def _text(node: Any | None) -> str:
    if node is None:
        return ""
    return node.text.decode("utf-8", "replace")


_GENERIC_ARGS = re.compile(r"<[^<>]*>")


def _clean_name(name: str) -> str:
    """`ns::Foo<T>::bar` -> `ns.Foo.bar`: symbols are dotted and free of generics and spaces."""
    prev = None
    while prev != name:
        prev, name = name, _GENERIC_ARGS.sub("", name)
    name = name.replace("::", ".").replace("->", ".")
    name = re.sub(r"\s+", "", name)
    return name.strip("\"'`")


def _c_declarator_name(node: Any | None) -> str | None:
    """Walk a C/C++ declarator chain (pointer, function, array, reference) down to its name."""
    depth = 0
    while node is not None and depth < 16:
        depth += 1
        t = node.type
        if t in ("identifier", "field_identifier", "type_identifier", "destructor_name", "operator_name"):
            return _text(node)
        if t in ("qualified_identifier", "scoped_identifier"):
            return _text(node)
        inner = node.child_by_field_name("declarator")
        if inner is None:
            named = [c for c in node.named_children if c.type != "parameter_list"]
            inner = named[0] if named else None
        node = inner
    return None


# --------------------------------------------------------------------------------------------
# Definition classification
# --------------------------------------------------------------------------------------------


@dataclass
class _Def:
    kind: str  # function | method | class | scope
    name: str | None
    node: Any  # the inner definition node (after unwrapping)
    body_field: str | None = None  # containers / scopes: where the members are


def _unwrap(node: Any, spec: _Spec, depth: int = 0) -> Any:
    """Decorators, `export`, `template <...>`: the definition is inside."""
    if depth > 4 or node.type not in spec.wrappers:
        return node
    fld = spec.wrappers[node.type]
    inner = node.child_by_field_name(fld) if fld else None
    if inner is None:
        inner = node.child_by_field_name("declaration") or node.child_by_field_name("value")
    if inner is None:
        candidates = [c for c in node.named_children if c.type not in spec.attach]
        inner = candidates[-1] if candidates else None
    if inner is None:
        return node
    return _unwrap(inner, spec, depth + 1)


_JS_FUNCTIONS = frozenset({"function_expression", "arrow_function", "function", "generator_function"})


def _classify(node: Any, spec: _Spec, language: str, in_class: bool) -> _Def | None:
    inner = _unwrap(node, spec)
    t = inner.type
    # `export default function () {}`, `export default () => ...`, `export default class {}`: what other
    # modules import is named `default`, so the definition is found under that name.
    anonymous_default = node.type == "export_statement" and inner == node.child_by_field_name("value")
    if anonymous_default and t in _JS_FUNCTIONS:
        return _Def("function", "default", inner)
    if t == "ERROR":  # text the grammar could not place can still hold whole definitions (C's split `#ifdef` headers)
        return _Def("scope", None, inner, "")
    if _swallowed_defs(inner, language):
        return None

    # TypeScript namespaces hide in an expression_statement; JS assigns functions to members.
    if t == "expression_statement" and inner.named_child_count == 1:
        child = inner.named_children[0]
        if child.type in spec.scopes:
            inner, t = child, child.type
        elif child.type == "assignment_expression":
            right = child.child_by_field_name("right")
            if right is not None and right.type in _JS_FUNCTIONS:
                return _Def("function", _clean_name(_text(child.child_by_field_name("left"))), inner)

    if t in ("field_definition", "public_field_definition") and in_class:  # `handle = (e) => {...}` in a class
        value = inner.child_by_field_name("value")
        name = inner.child_by_field_name("property") or inner.child_by_field_name("name")
        if value is not None and name is not None and value.type in _JS_FUNCTIONS:
            return _Def("method", _clean_name(_text(name)), inner)
        return None

    if t in ("lexical_declaration", "variable_declaration") and language in ("javascript", "typescript", "tsx"):
        decls = [c for c in inner.named_children if c.type == "variable_declarator"]
        if len(decls) == 1:
            value = decls[0].child_by_field_name("value")
            name = _text(decls[0].child_by_field_name("name"))
            if value is not None and value.type in _JS_FUNCTIONS:
                return _Def("method" if in_class else "function", name, inner)
            if value is not None and value.type in ("class", "class_expression"):
                return _Def("class", name, value, "body")
        return None

    if t in spec.functions:
        return _function_def(inner, language, in_class)
    if t in spec.containers:
        name = inner.child_by_field_name("name")
        if language == "rust" and t == "impl_item":
            typ = inner.child_by_field_name("type")
            name_s = _clean_name(_text(typ)) if typ is not None else None
        else:
            name_s = _clean_name(_text(name)) if name is not None else "default" if anonymous_default else None
        body = inner.child_by_field_name(spec.containers[t])
        if body is None:  # C++ forward declaration `class Foo;`, Rust `struct X;`
            return _Def("class", name_s, inner) if name_s else None
        return _Def("class", name_s, inner, spec.containers[t])
    if t in spec.classes:
        return _class_like(inner, language)
    if t in ("if_statement", "try_statement"):  # Python: a scope only when it holds definitions
        return _Def("scope", None, inner, "") if _defined_names(inner, spec, language) else None
    if t in spec.scopes:
        name = None if t.startswith("preproc_") else inner.child_by_field_name("name")  # not `#ifdef X`
        return _Def("scope", _clean_name(_text(name)) if name is not None else None, inner, spec.scopes[t])
    if language in ("c", "cpp") and t == "declaration":
        typ = inner.child_by_field_name("type")
        if typ is not None and typ.child_by_field_name("body") is not None:
            nm = typ.child_by_field_name("name")
            return _Def("class", _clean_name(_text(nm)) if nm is not None else None, inner)
    return None


_PY_HEADER = re.compile(r"^([ \t]*)(?:async[ \t]+)?(?:def|class)[ \t]+(\w+)")


def _overload_name(node: Any, spec: _Spec, language: str | None) -> str | None:
    """The name of a TypeScript overload signature (`function f(a: string): void;`), else None."""
    if language not in ("typescript", "tsx"):
        return None
    inner = _unwrap(node, spec)
    if inner.type != "function_signature":
        return None
    name = inner.child_by_field_name("name")
    return _text(name) if name is not None else None


def _swallowed_defs(node: Any, language: str) -> list[tuple[int, str]]:
    """Rows and names of the Python definitions that a definition with a syntax error swallowed: an unclosed
    `def f(a,` parses as one function running over the definitions after it. Found by their header lines at
    the broken definition's own indentation (the tree no longer has them)."""
    if language != "python" or not node.has_error or node.type not in ("function_definition", "class_definition"):
        return []
    lines = _text(node).split("\n")
    out = []
    for i, ln in enumerate(lines[1:], 1):
        m = _PY_HEADER.match(ln)
        if m and len(m.group(1)) == node.start_point[1]:
            out.append((node.start_point[0] + i, m.group(2)))
    own = _PY_HEADER.match(lines[0])
    return [(node.start_point[0], own.group(2)), *out] if out and own else out


def _members(body: Any, spec: _Spec) -> list[Any]:
    """The nodes of a body, looking through the member lists `spec.flatten` names."""
    out: list[Any] = []
    stack = list(reversed(body.named_children))
    while stack:
        m = stack.pop()
        if m.type in spec.flatten:
            stack.extend(reversed(m.named_children))
        else:
            out.append(m)
    return out


def _defined_names(scope: Any, spec: _Spec, language: str) -> list[str]:
    """Names of the functions and classes directly inside a scope: the symbol of a scope kept whole."""
    defs = (_classify(m, spec, language, False) for m in _members(scope, spec))
    return [d.name for d in defs if d is not None and d.kind != "scope" and d.name]


def _function_def(node: Any, language: str, in_class: bool) -> _Def:
    kind = "method" if in_class else "function"
    if language == "go" and node.type == "method_declaration":
        recv = node.child_by_field_name("receiver")
        rtype = None
        if recv is not None:
            stack = [recv]
            while stack and rtype is None:
                n = stack.pop(0)
                if n.type == "type_identifier":
                    rtype = _text(n)
                stack.extend(n.named_children)
        name = _text(node.child_by_field_name("name"))
        return _Def("method", f"{rtype}.{name}" if rtype else name, node)
    if language in ("c", "cpp"):
        raw = _c_declarator_name(node.child_by_field_name("declarator"))
        name = _clean_name(raw) if raw else None
        if name and "." in name and not in_class:
            kind = "method"  # `int Foo::bar()` defined outside its class
        return _Def(kind, name, node)
    if node.type == "constructor_declaration":
        kind = "method"
    name = node.child_by_field_name("name")
    return _Def(kind, _clean_name(_text(name)) if name is not None else None, node)


def _class_like(node: Any, language: str) -> _Def | None:
    t = node.type
    if language == "go":  # type_declaration: one or more type_specs
        names = [_text(s.child_by_field_name("name")) for s in node.named_children if "spec" in s.type]
        names = [n for n in names if n]
        return _Def("class", ",".join(names[:MAX_SYMBOL_NAMES]) or None, node)
    if language in ("c", "cpp"):
        if t == "type_definition":
            typ = node.child_by_field_name("type")
            name = _c_declarator_name(node.child_by_field_name("declarator"))
            if typ is None or typ.child_by_field_name("body") is None:
                return None  # `typedef int foo_t;` is a statement, not a definition
            return _Def("class", _clean_name(name) if name else None, node)
        if node.child_by_field_name("body") is None:
            return None
    name = node.child_by_field_name("name")
    return _Def("class", _clean_name(_text(name)) if name is not None else None, node)


# Names assigned by a statement: symbols of module-level groups ("DEFAULT_POOLSIZE", "A,B").
def _assigned_names(node: Any, language: str) -> list[str]:
    t = node.type
    out: list[str] = []
    if language == "python":
        if t == "expression_statement" and node.named_child_count == 1:
            a = node.named_children[0]
            while a is not None and a.type == "assignment":
                left = a.child_by_field_name("left")
                if left is not None:
                    if left.type == "identifier":
                        out.append(_text(left))
                    elif left.type in ("pattern_list", "tuple_pattern"):
                        out.extend(_text(c) for c in left.named_children if c.type == "identifier")
                right = a.child_by_field_name("right")
                a = right if right is not None and right.type == "assignment" else None
        return out
    if language in ("javascript", "typescript", "tsx"):
        if t == "export_statement":
            inner = node.child_by_field_name("declaration")
            return _assigned_names(inner, language) if inner is not None else []
        if t in ("lexical_declaration", "variable_declaration"):
            for d in node.named_children:
                if d.type == "variable_declarator":
                    n = d.child_by_field_name("name")
                    if n is not None and n.type == "identifier":
                        out.append(_text(n))
        return out
    if language == "go":
        if t in ("const_declaration", "var_declaration"):
            for spec in node.named_children:
                if spec.type in ("const_spec", "var_spec"):
                    out.extend(_text(c) for c in spec.children_by_field_name("name"))
        return out
    if language == "rust":
        if t in ("const_item", "static_item"):
            n = node.child_by_field_name("name")
            if n is not None:
                out.append(_text(n))
        return out
    if language == "java":
        if t in ("field_declaration", "constant_declaration"):
            for d in node.named_children:
                if d.type == "variable_declarator":
                    n = d.child_by_field_name("name")
                    if n is not None:
                        out.append(_text(n))
        return out
    if language in ("c", "cpp"):
        if t in ("preproc_def", "preproc_function_def"):
            n = node.child_by_field_name("name")
            if n is not None:
                out.append(_text(n))
        elif t in ("declaration", "field_declaration"):
            for d in node.children_by_field_name("declarator"):
                name = _c_declarator_name(d)
                if name:
                    out.append(_clean_name(name))
        return out
    return out


# --------------------------------------------------------------------------------------------
# The chunker
# --------------------------------------------------------------------------------------------


@dataclass
class _Seg:
    start: int  # 0-based rows, inclusive
    end: int
    kind: str
    symbol: str | None
    gap: bool = False


# Lines that say nothing on their own: closing brackets (maybe with a `// namespace x` comment),
# `#endif`, `#else`, `end`. A gap made only of these is folded into a neighbouring chunk.
_TRIVIAL_LINE = re.compile(r"^\s*(?:[\]})>;,]+\s*(?://.*|/\*.*\*/)?|#\s*(?:endif|else)\b.*|end)?\s*$")
# Python branch headers (`if WIN:`, `else:`, `except ImportError:`) left between the definitions of a block:
# folded into the chunk after them, the definition they guard.
_BRANCH_LINE = re.compile(r"^\s*(?:(?:if|elif|while|with|except)\b.*|else|try|finally)\s*:\s*(?:#.*)?$")


class _Chunker:
    def __init__(
        self,
        path: str,
        text: str,
        language: str | None,
        max_tokens: int,
    ) -> None:
        self.path = path
        self.language = language
        self.lines = source_lines(text)
        self.blank = [not ln.strip() for ln in self.lines]
        self.max_tokens = max_tokens
        self._line_tokens: list[int] | None = None

    # ---- basics -------------------------------------------------------------------------

    def text_of(self, s: int, e: int) -> str:
        return "\n".join(self.lines[s : e + 1])

    def fits(self, s: int, e: int) -> bool:
        return estimate_tokens(self.text_of(s, e)) <= self.max_tokens

    @property
    def line_tokens(self) -> list[int]:
        if self._line_tokens is None:
            self._line_tokens = [estimate_tokens(ln) + 1 for ln in self.lines]
        return self._line_tokens

    def trim(self, s: int, e: int) -> tuple[int, int] | None:
        while s <= e and self.blank[s]:
            s += 1
        while e >= s and self.blank[e]:
            e -= 1
        return (s, e) if s <= e else None

    # ---- windows ------------------------------------------------------------------------

    def window_ranges(
        self,
        s: int,
        e: int,
        *,
        max_lines: int,
        overlap: int,
        prefer: set[int] | frozenset[int] = frozenset(),
    ) -> list[tuple[int, int]]:
        """Cut rows s..e into windows within the token budget and `max_lines`.

        Cuts prefer to fall before a `prefer` row (a heading, a statement start), then after a
        blank line; only a hard cut (mid-paragraph) repeats `overlap` lines in the next window.
        """
        out: list[tuple[int, int]] = []
        tr = self.trim(s, e)
        if tr is None:
            return out
        s, e = tr
        toks = self.line_tokens
        while s <= e:
            total = 0
            j = s
            while j <= e and j - s < max_lines:
                if j > s and total + toks[j] > self.max_tokens:
                    break
                total += toks[j]
                j += 1
            end = j - 1
            boundary = True
            if end >= e:
                nxt = e + 1
            elif end == s:
                nxt = s + 1
            else:
                lo = s + max(1, (end - s + 1) // 2)
                nxt = next((r for r in range(end + 1, lo, -1) if r in prefer), 0)
                if not nxt:
                    nxt = next((r for r in range(end + 1, lo, -1) if self.blank[r - 1]), 0)
                if not nxt:
                    nxt, boundary = end + 1, False
            # the per-line sum rounds line by line: check the joined text
            while nxt - 1 > s and not self.fits(s, nxt - 1):
                nxt -= max(1, (nxt - 1 - s) // 8)
                boundary = False
            tr = self.trim(s, nxt - 1)
            if tr is not None:
                out.append(tr)
            if nxt > e:
                break
            if boundary:
                s = nxt
            else:
                s = max(nxt - min(overlap, (nxt - s) // 2), s + 1)
            while s <= e and self.blank[s]:
                s += 1
        return out

    def plain_windows(self, prefer: set[int], symbol_at: Callable[[int], str | None]) -> list[_Seg]:
        ranges = self.window_ranges(
            0, len(self.lines) - 1, max_lines=WINDOW_LINES, overlap=WINDOW_OVERLAP, prefer=prefer
        )
        return [_Seg(s, e, "window", symbol_at(s)) for s, e in ranges]

    # ---- tree-sitter ------------------------------------------------------------------------

    def tree_segments(self, root: Any, spec: _Spec) -> list[_Seg]:
        return self.scope(list(root.named_children), 0, len(self.lines) - 1, None, "module", False, spec, 0)

    def scope(
        self,
        children: Sequence[Any],
        lo: int,
        hi: int,
        prefix: str | None,
        gap_kind: str,
        in_class: bool,
        spec: _Spec,
        depth: int,
    ) -> list[_Seg]:
        """Chunk the definitions among `children`, then fill rows lo..hi they leave uncovered."""
        assert self.language is not None
        segs: list[_Seg] = []
        lead: list[Any] = []  # comments / attributes directly above the next node
        prev_end = lo - 1
        stmt_rows: list[int] = []  # start rows of statements: preferred cut points for gap windows
        names_at: dict[int, list[str]] = {}
        overload: tuple[str, int] | None = None  # TypeScript overload signatures above: their name, first row

        for child in children:
            cs, ce = _first_row(child), _last_row(child)
            signature = _overload_name(child, spec, self.language)
            if signature is not None:
                if overload is None or overload[0] != signature:
                    overload = (signature, self.lead_start(lead, cs))
                lead = []
                stmt_rows.append(cs)
                prev_end = max(prev_end, ce)
                continue
            if child.type in spec.attach:
                if cs <= prev_end:  # a trailing comment on the previous statement's line
                    lead = []
                elif lead and cs > _last_row(lead[-1]) + 1:
                    lead = [child]
                else:
                    lead.append(child)
                stmt_rows.append(cs)
                prev_end = max(prev_end, ce)
                continue
            d = _classify(child, spec, self.language, in_class) if depth < 24 else None
            if d is None:
                overload = None
                stmt_rows.append(cs)
                if gap_kind == "module":
                    names = _assigned_names(_unwrap(child, spec), self.language)
                    if names:
                        names_at.setdefault(cs, []).extend(names)
                for row, name in _swallowed_defs(_unwrap(child, spec), self.language):
                    stmt_rows.append(row)
                    names_at.setdefault(row, []).append(name)
                lead = []
                prev_end = max(prev_end, ce)
                continue
            start = self.lead_start(lead, cs)
            if overload is not None and overload[0] == d.name:  # the signatures belong to the implementation
                start = overload[1]
            lead, overload = [], None
            symbol = d.name if not prefix else (f"{prefix}.{d.name}" if d.name else prefix)
            new = self.definition(child, d, start, ce, symbol, spec, depth)
            stmt_rows.append(start)
            prev_end = max(prev_end, ce)
            if not new:
                continue
            if segs and new[0].start <= segs[-1].end:
                new = self.share_row(segs[-1], new)
            segs.extend(new)

        gap_symbol = prefix if gap_kind == "class" else None
        segs.extend(self.gaps(segs, lo, hi, gap_kind, gap_symbol, set(stmt_rows), names_at))
        segs.sort(key=lambda g: (g.start, g.end))
        return self.merge_trivial(segs)

    def lead_start(self, lead: list[Any], cs: int) -> int:
        """Where a definition whose first row is cs starts with the comments right above it: as many of them,
        nearest first, as fill half a chunk. Comments beyond that (a block of commented-out code) stay in the
        module's own chunks instead of pushing the definition out of its first one."""
        if not lead or _last_row(lead[-1]) < cs - 1:
            return cs
        start = cs
        for node in reversed(lead):
            if estimate_tokens(self.text_of(_first_row(node), cs - 1)) > self.max_tokens // 2:
                break
            start = min(start, _first_row(node))
        return start

    def share_row(self, last: _Seg, new: list[_Seg]) -> list[_Seg]:
        """A definition starts on the row where `last` ends (`f() {} g() {`): rows cannot be split. One-liners
        merge into `last` when they fit with it; otherwise the shared rows stay with `last` and the next
        definition keeps its own chunks from the row after them. Returns the segments still to add."""
        end = max(s.end for s in new)
        if self.fits(last.start, end):
            last.end = max(last.end, end)
            return []
        rest = []
        for s in new:
            if s.end <= last.end:
                continue
            tr = self.trim(max(s.start, last.end + 1), s.end)
            if tr is not None:
                s.start, s.end = tr
                rest.append(s)
        return rest

    def definition(
        self, node: Any, d: _Def, start: int, end: int, symbol: str | None, spec: _Spec, depth: int
    ) -> list[_Seg]:
        if d.kind == "scope":
            if self.fits(start, end):
                assert self.language is not None
                inside = dict.fromkeys(_defined_names(d.node, spec, self.language))
                names = symbol or ",".join(list(inside)[:MAX_SYMBOL_NAMES])
                return [_Seg(start, end, "module", names or None)]
            body = d.node.child_by_field_name(d.body_field) if d.body_field else d.node
            members = _members(body, spec) if body is not None else []
            return self.scope(members, start, end, symbol, "module", False, spec, depth + 1)
        if self.fits(start, end) or start == end:  # rows cannot be split: a long line stays whole
            return [_Seg(start, end, d.kind, symbol)]
        if d.kind == "class" and d.body_field:
            body = d.node.child_by_field_name(d.body_field)
            if body is not None:
                return self.scope(_members(body, spec), start, end, symbol, "class", True, spec, depth + 1)
        # too big and not splittable by members: windows, cut preferably between statements
        prefer: set[int] = set()
        body = d.node.child_by_field_name("body")
        stack = [body] if body is not None else []
        while stack:  # statements of the body, looking through one block level
            n = stack.pop()
            for c in n.named_children:
                prefer.add(_first_row(c))
                if c.type in ("block", "statement_list", "compound_statement", "statement_block"):
                    stack.append(c)
        ranges = self.window_ranges(start, end, max_lines=CODE_WINDOW_LINES, overlap=0, prefer=prefer)
        if len(ranges) == 1:
            return [_Seg(ranges[0][0], ranges[0][1], d.kind, symbol)]
        return [_Seg(s, e, "window", f"{symbol}#part{i}" if symbol else None) for i, (s, e) in enumerate(ranges, 1)]

    def gaps(
        self,
        segs: list[_Seg],
        lo: int,
        hi: int,
        kind: str,
        symbol: str | None,
        prefer: set[int],
        names_at: dict[int, list[str]],
    ) -> list[_Seg]:
        covered = [False] * (hi - lo + 1)
        for g in segs:
            for r in range(max(g.start, lo), min(g.end, hi) + 1):
                covered[r - lo] = True
        out: list[_Seg] = []
        r = lo
        while r <= hi:
            if covered[r - lo] or self.blank[r]:
                r += 1
                continue
            s = r
            while r <= hi and not covered[r - lo]:
                r += 1
            tr = self.trim(s, r - 1)
            if tr is None:
                continue
            for ws, we in self.window_ranges(tr[0], tr[1], max_lines=CODE_WINDOW_LINES, overlap=0, prefer=prefer):
                sym = symbol
                if kind == "module":
                    names: list[str] = []
                    for row in range(ws, we + 1):
                        names.extend(names_at.get(row, ()))
                    sym = ",".join(list(dict.fromkeys(names))[:MAX_SYMBOL_NAMES]) or symbol
                out.append(_Seg(ws, we, kind, sym, gap=True))
        return out

    def merge_trivial(self, segs: list[_Seg]) -> list[_Seg]:
        """Fold gaps made only of closing braces / `#endif` into the chunk before (or after) them."""
        out: list[_Seg] = []
        pending: list[_Seg] = []
        for g in segs:
            rows = self.lines[g.start : g.end + 1]
            trivial = g.gap and all(_TRIVIAL_LINE.match(ln) for ln in rows)
            header = g.gap and self.language == "python" and all(_BRANCH_LINE.match(ln) for ln in rows)
            if trivial and out and (out[-1].end >= g.start or self.fits(out[-1].start, g.end)):
                out[-1].end = max(out[-1].end, g.end)
            elif trivial or header:
                pending.append(g)
            else:
                if pending and self.fits(min(p.start for p in pending), g.end):
                    g.start = min(p.start for p in pending)
                    pending = []
                out.extend(pending)
                pending = []
                out.append(g)
        return out + pending


# --------------------------------------------------------------------------------------------
# Windows for languages without a grammar
# --------------------------------------------------------------------------------------------

# Only the markers are matched by patterns; the title is cut with str methods (a pattern for the whole
# line backtracks cubically on a heading padded with spaces).
_MD_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]|$)")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _heading_title(ln: str) -> str | None:
    m = _MD_HEADING.match(ln)
    if m is None:
        return None
    title = ln[m.end():].strip()
    closed = title.rstrip("#")
    if closed != title and (not closed or closed[-1] in " \t"):  # a closing `###` run only after a space
        title = closed.strip()
    return title or None


def _markdown_marks(lines: list[str]) -> tuple[set[int], list[str | None]]:
    """Heading rows (preferred cuts) and, per row, the heading it sits under (its symbol)."""
    prefer: set[int] = set()
    current: list[str | None] = []
    heading: str | None = None
    fence = ""  # the open fence's marker: only a run of the same character, as long or longer, closes it
    for i, ln in enumerate(lines):
        m = _FENCE.match(ln)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not ln[m.end():].strip():
                fence = ""
        elif m and not (m.group(1)[0] == "`" and "`" in ln[m.end():]):  # a backtick fence's info has no backtick
            fence = m.group(1)
        else:
            title = _heading_title(ln)
            if title:
                heading = title[:120]
                prefer.add(i)
        current.append(heading)
    return prefer, current


def _config_prefer(lines: list[str], language: str | None) -> set[int]:
    prefer: set[int] = set()
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        if language in ("toml", "ini") and ln.lstrip().startswith("["):
            prefer.add(i)
        elif language == "yaml" and (ln[:1].isalnum() or ln[:1] in "\"'_" or ln.startswith("---")):
            prefer.add(i)
        elif language not in ("toml", "ini", "yaml") and not ln[:1].isspace() and i > 0 and not lines[i - 1].strip():
            prefer.add(i)  # a top-level line after a blank line: a new paragraph / declaration
    return prefer


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def chunk_text(
    path: str,
    text: str,
    language: str | None,
    *,
    max_tokens: int = 384,
) -> list[Chunk]:
    """Chunk one file (see the module docstring for the guarantees).

    `max_tokens` is measured with `estimate_tokens`: files are chunked before any model is loaded, so
    a chunk's real token count (known when it is compiled) may differ a little.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    ck = _Chunker(path, text, language, max_tokens)
    if not ck.lines or all(ck.blank):
        return []

    segs: list[_Seg] | None = None
    spec = _SPECS.get(language or "")
    if spec is not None:
        try:
            tree = _parse(language, text.encode("utf-8", "surrogatepass"))  # type: ignore[arg-type]
            root = tree.root_node
            if root.type != "ERROR":
                segs = ck.tree_segments(root, spec)
                if not _valid(ck, segs):
                    log.warning("chunking %s: definition chunks failed validation; using windows", path)
                    segs = None
        except Exception as exc:  # a grammar problem must never stop indexing
            log.warning("chunking %s: parser failed (%s); using windows", path, exc)
            segs = None
    if segs is None:
        if language == "markdown":
            prefer, under = _markdown_marks(ck.lines)
            segs = ck.plain_windows(prefer, lambda r: under[r])
        else:
            segs = ck.plain_windows(_config_prefer(ck.lines, language), lambda r: None)

    return [
        Chunk(
            path=path,
            language=language,
            symbol=g.symbol,
            kind=g.kind,
            start_line=g.start + 1,
            end_line=g.end + 1,
            text=ck.text_of(g.start, g.end),
        )
        for g in segs
    ]


def _valid(ck: _Chunker, segs: Iterable[_Seg]) -> bool:
    """Coverage of every non-blank row, no blank chunk, spans in range: else use windows."""
    covered = [False] * len(ck.lines)
    for g in segs:
        if g.start < 0 or g.end >= len(ck.lines) or g.start > g.end:
            return False
        if all(ck.blank[g.start : g.end + 1]):
            return False
        for r in range(g.start, g.end + 1):
            covered[r] = True
    return all(c or b for c, b in zip(covered, ck.blank, strict=True))
