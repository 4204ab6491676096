"""Walk one repository and decide, for every path, whether it becomes memory and why not.

Why every skip carries a reason: the user must be able to see (in `doctor`, the GUI, the CLI)
that `.env` was left out as a secret and `dist/` as vendored, instead of wondering why the model
does not know a file. The walk never raises for a single bad path (permissions, a file deleted
mid-walk, a symlink loop): it records a skip and goes on.

Reasons: `gitignore`, `repomemignore`, `extra_ignore`, `vendored`, `secret_name`,
`secret_content`, `binary`, `encoding`, `too_large`, `minified`, `symlink`, `symlink_outside`,
`symlink_loop`, `unreadable`. `.git/` itself is skipped silently (it is never content).

Symlinks are never followed: a link leading out of the root could pull in `~/.ssh`, and a link
inside the root only duplicates what the walk reaches at the real path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pathspec

DEFAULT_MAX_FILE_BYTES = 512_000
# A line longer than this is generated (a one-line bundle or JSON dump): rows are never cut, so it would make
# one chunk far over any chunk budget, which no compile context holds.
MAX_LINE_CHARS = 5_000

LANGUAGE_BY_EXT: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".tsx": "tsx",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".c++": "cpp",
    ".hpp": "cpp",
    ".hh": "cpp",
    ".hxx": "cpp",
    ".ipp": "cpp",
    ".md": "markdown",
    ".markdown": "markdown",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".jsonc": "json",
    ".ini": "ini",
    ".cfg": "ini",
    ".conf": "ini",
    ".rst": "text",
    ".txt": "text",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "csharp",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".swift": "swift",
    ".scala": "scala",
    ".lua": "lua",
    ".sql": "sql",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".scss": "css",
    ".vue": "vue",
    ".svelte": "svelte",
    ".xml": "xml",
    ".cmake": "cmake",
    ".gradle": "gradle",
    ".proto": "protobuf",
    ".r": "r",
    ".jl": "julia",
    ".ex": "elixir",
    ".exs": "elixir",
    ".erl": "erlang",
    ".hs": "haskell",
    ".ml": "ocaml",
    ".zig": "zig",
    ".dart": "dart",
    ".m": "objc",
    ".mm": "objc",
    ".pl": "perl",
    ".ps1": "powershell",
    ".bat": "batch",
    ".tf": "terraform",
}
LANGUAGE_BY_NAME: dict[str, str] = {
    "Makefile": "make",
    "GNUmakefile": "make",
    "makefile": "make",
    "Dockerfile": "dockerfile",
    "CMakeLists.txt": "cmake",
    "Rakefile": "ruby",
    "Gemfile": "ruby",
    "Justfile": "make",
    "justfile": "make",
}

# Opened only to be skipped: reading them would just find NUL bytes.
BINARY_EXTS = frozenset(
    """.png .jpg .jpeg .gif .bmp .ico .icns .webp .tif .tiff .psd .pdf .zip .gz .tgz .bz2 .xz .zst .7z
    .rar .tar .jar .war .class .so .dylib .dll .exe .o .a .lib .obj .pyc .pyo .pyd .whl .egg .gguf .bin
    .safetensors .pt .pth .onnx .npy .npz .pkl .h5 .mp3 .mp4 .wav .ogg .flac .mov .avi .mkv .webm .woff
    .woff2 .ttf .otf .eot .sqlite .sqlite3 .db .kv .wasm .DS_Store""".split()
)

VENDORED_DIRS = frozenset(
    {
        "node_modules",
        "vendor",
        "third_party",
        "dist",
        "build",
        ".venv",
        "venv",
        "__pycache__",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "site-packages",
        ".eggs",
        ".gradle",
        ".next",
        ".nuxt",
        ".cache",
        "bower_components",
    }
)
VENDORED_FILES = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "bun.lockb",
        "poetry.lock",
        "Pipfile.lock",
        "pdm.lock",
        "uv.lock",
        "Cargo.lock",
        "composer.lock",
        "Gemfile.lock",
        "go.sum",
        "flake.lock",
    }
)
VENDORED_SUFFIXES = (".min.js", ".min.css", ".min.mjs", ".js.map", ".css.map", ".egg-info")

# Names that hold secrets. `*secret*` and `credentials*` do not apply to source files of a known
# programming language (`secrets.py` is usually code that *handles* secrets); the content scan
# below still catches a literal key inside them.
_SECRET_NAME_RES = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\.env",
        r"\.env\..+",
        r".*\.pem",
        r".*\.key",
        r"id_rsa.*",
        r"id_dsa.*",
        r"id_ecdsa.*",
        r"id_ed25519.*",
        r".*\.p12",
        r".*\.pfx",
        r".*\.keystore",
        r".*\.jks",
        r"\.npmrc",
        r"\.pypirc",
        r"\.netrc",
        r"_netrc",
        r"\.htpasswd",
        r"\.git-credentials",
        r"\.envrc",
        r".*\.env",
        r"\.env[_-].+",
        r"\.pgpass",
        r"\.s3cfg",
        r".*\.ppk",
    )
]
_SECRET_NAME_LOOSE_RES = [re.compile(p, re.IGNORECASE) for p in (r"credentials.*", r".*secret.*")]
# Templates meant to be committed: their values are placeholders.
_ENV_TEMPLATE_RE = re.compile(
    r"\.env[._-](?:example|sample|template|dist|defaults)|(?:example|sample|template)\.env", re.IGNORECASE)
_CODE_LANGUAGES = frozenset(
    {
        "python",
        "javascript",
        "typescript",
        "tsx",
        "go",
        "rust",
        "java",
        "c",
        "cpp",
        "ruby",
        "php",
        "csharp",
        "kotlin",
        "swift",
        "scala",
        "lua",
        "shell",
    }
)

# One pass for the unmistakable shapes (private keys, AWS, GitHub, Slack, OpenAI/Anthropic keys).
_PRIVATE_KEY_RE = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_TOKEN_RE = re.compile(
    r"(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[baprs]-[A-Za-z0-9-]{10,}|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,})"
)
# `api_key = "..."`, `"password": "..."`, `SECRET_KEY = '...'`: found value-first (fast), then the
# name before it is checked. The value must look random (letters and digits, varied) so that
# `token_type = "access_token_header"` or `sk-xxxxxxxx...` placeholders are not secrets.
_QUOTED_VALUE_RE = re.compile(r"""[:=]\s*["']([A-Za-z0-9/+_\-]{16,}={0,2})["']""")
# Configuration (YAML, INI, .env-style, shell `export`) writes values bare, to the end of the line; in
# source code a bare right-hand side is an expression (`api_key = settings.api_key_v2`), not a value.
_BARE_VALUE_RE = re.compile(r"""(?m)[:=][ \t]*([A-Za-z0-9/+_\-]{16,}={0,2})[ \t]*\r?$""")
_SECRET_KEY_NAME_RE = re.compile(r"""(?i)(?:api[_-]?key|secret|token|passw(?:or)?d)[\w-]{0,24}["']?\s*$""")


@dataclass(frozen=True)
class RepoFile:
    """One file that becomes memory. `text` has its newlines normalised to "\\n"; `sha256` is of the bytes."""

    rel: str
    abs: Path
    size: int
    mtime: float
    language: str | None
    sha256: str
    text: str

    @property
    def path(self) -> str:
        """Alias of `rel`: the path chunks and cubes are keyed by."""
        return self.rel


@dataclass(frozen=True)
class Skip:
    """A path left out and why (a skipped directory is one entry, its contents are not listed)."""

    rel: str
    reason: str


@dataclass
class WalkResult:
    files: list[RepoFile] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def counts_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class NotTextError(ValueError):
    """A file that is not UTF-8 or UTF-16 text: `reason` is `binary` or `encoding`."""

    def __init__(self, reason: str, path: str | os.PathLike[str]) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def language_for(rel_path: str) -> str | None:
    """Language name from the file name (None for text we have no name for)."""
    name = PurePosixPath(rel_path).name
    if name in LANGUAGE_BY_NAME:
        return LANGUAGE_BY_NAME[name]
    suffix = PurePosixPath(name).suffix
    return LANGUAGE_BY_EXT.get(suffix) or LANGUAGE_BY_EXT.get(suffix.lower())


def decode_text(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> str:
    """UTF-8, or UTF-16 where a byte-order mark says so (the BOM is dropped), with newlines normalised;
    raises NotTextError otherwise.

    Why no latin-1 fallback: every byte string decodes as latin-1, so it would turn binary files
    into garbage memory; a repository in another encoding is rare enough to be told, not guessed.
    Windows tools write UTF-16 with a BOM (resource files, PowerShell, exported logs): the mark names it.
    """
    if data.startswith(_UTF16_BOMS):
        codec = "utf-16"  # the BOM picks the byte order
    elif b"\x00" in data:  # no UTF-8 text has one; searching the whole file costs little beside reading it
        raise NotTextError("binary", path)
    else:
        codec = "utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        raise NotTextError("encoding", path) from None
    if codec == "utf-16" and "\x00" in text:  # UTF-32, whose little-endian BOM starts like UTF-16's
        raise NotTextError("binary", path)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _looks_random(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and len(set(value)) > 6


def secret_in_text(text: str, language: str | None = None) -> str | None:
    """The kind of secret found in `text` (a short label, never the secret itself), or None.

    `language`: the file's (None for configuration and prose, such as a note): in source code only quoted
    values count."""
    if "PRIVATE KEY" in text and _PRIVATE_KEY_RE.search(text):
        return "private_key"
    for m in _TOKEN_RE.finditer(text):
        if _looks_random(m.group(0)[4:]):
            return "token"
    value_res = [_QUOTED_VALUE_RE]
    if language not in _CODE_LANGUAGES or language == "shell":
        value_res.append(_BARE_VALUE_RE)
    for value_re in value_res:
        for m in value_re.finditer(text):
            if _looks_random(m.group(1)) and _SECRET_KEY_NAME_RE.search(text, max(0, m.start() - 48), m.start()):
                return "assignment"
    return None


def secret_name(rel_path: str, language: str | None = None) -> bool:
    """Whether the file name alone says it holds secrets."""
    name = PurePosixPath(rel_path).name
    if _ENV_TEMPLATE_RE.fullmatch(name):
        return False
    if any(rx.fullmatch(name) for rx in _SECRET_NAME_RES):
        return True
    lang = language if language is not None else language_for(rel_path)
    if lang in _CODE_LANGUAGES:
        return False
    return any(rx.fullmatch(name) for rx in _SECRET_NAME_LOOSE_RES)


def _vendored(name: str, is_dir: bool) -> bool:
    if is_dir:
        return name in VENDORED_DIRS or name.endswith(".egg-info")
    return name in VENDORED_FILES or name.endswith(VENDORED_SUFFIXES)


def _entry_paths(value: object) -> Iterable[str]:
    """The file paths in a package.json entry field (`main`, `module`, `exports`, `bin`, ...): a string, or
    maps and lists of them, nested (conditional exports)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _entry_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from _entry_paths(v)


_ENTRY_FIELDS = ("main", "module", "browser", "types", "typings", "exports", "bin")


def package_entry_dirs(root: Path) -> frozenset[str]:
    """Folders (posix, relative to `root`) holding what the root package.json says the package is.

    A published npm package often ships its only readable code in `build/` or `dist/`, which are vendored
    output in a working tree; the package's own entry points say which of them is the code."""
    try:
        meta = json.loads((root / "package.json").read_text("utf-8"))
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(meta, dict):
        return frozenset()
    dirs: set[str] = set()
    for name in _ENTRY_FIELDS:
        for entry in _entry_paths(meta.get(name)):
            parts = [p for p in PurePosixPath(entry).parts if p not in (".", "/")]
            if ".." in parts or "*" in entry:
                continue
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
    return frozenset(dirs)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return []


class _IgnoreFile:
    """One ignore file's patterns, checked as git checks them. pathspec's gitignore rule that a file
    pattern outranks a folder pattern is right for files, not for folders, where git takes the last
    pattern that matches (`*` then `!*/` keeps every folder open for a later `!*.py`)."""

    def __init__(self, spec: pathspec.GitIgnoreSpec) -> None:
        self._files = spec
        self._folders = pathspec.PathSpec(spec.patterns)

    def check(self, path: str, is_dir: bool) -> bool | None:
        """True: ignored, False: re-included by a negation, None: no pattern matches."""
        return (self._folders if is_dir else self._files).check_file(path + ("/" if is_dir else "")).include


class IgnoreRules:
    """The path-only skip rules of one repository (no file content needed): fast enough for a watcher.

    `.gitignore` files apply to their own folder and below, deeper files win, `!negations` work
    (pathspec's gitignore semantics); `.git/info/exclude` counts as a root `.gitignore` of lowest
    priority. Answers are cached; call `reload()` when an ignore file changes.
    """

    def __init__(self, root: str | os.PathLike[str], extra_ignores: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self._extra_lines = [p for p in extra_ignores if p and p.strip()]
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Forget cached ignore files and answers (call after any .gitignore/.repomemignore change)."""
        with self._lock:
            self._git_specs: dict[str, _IgnoreFile | None] = {}
            self._cache: dict[tuple[str, bool], str | None] = {}
            self._exclude = self._spec(_read_lines(self.root / ".git" / "info" / "exclude"))
            self._repomem = self._spec(_read_lines(self.root / ".repomemignore"))
            self._extra = self._spec(self._extra_lines)
            self._entry_dirs = package_entry_dirs(self.root)

    @staticmethod
    def _spec(lines: list[str]) -> _IgnoreFile | None:
        lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            return None
        try:
            return _IgnoreFile(pathspec.GitIgnoreSpec.from_lines(lines))
        except Exception:  # a malformed pattern must not stop the walk: drop the bad lines
            good = []
            for ln in lines:
                try:
                    pathspec.GitIgnoreSpec.from_lines([ln])
                    good.append(ln)
                except Exception:
                    continue
            return _IgnoreFile(pathspec.GitIgnoreSpec.from_lines(good)) if good else None

    def _gitignore_of(self, dir_rel: str) -> _IgnoreFile | None:
        if dir_rel not in self._git_specs:
            folder = self.root / dir_rel if dir_rel else self.root
            self._git_specs[dir_rel] = self._spec(_read_lines(folder / ".gitignore"))
        return self._git_specs[dir_rel]

    def _git_ignored(self, rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        # deepest .gitignore first: the first one with an opinion decides
        for depth in range(len(parts) - 1, -1, -1):
            spec = self._gitignore_of("/".join(parts[:depth]))
            if spec is None:
                continue
            verdict = spec.check("/".join(parts[depth:]), is_dir)
            if verdict is not None:
                return verdict
        if self._exclude is not None:
            verdict = self._exclude.check(rel, is_dir)
            if verdict is not None:
                return verdict
        return False

    def _own_reason(self, rel: str, is_dir: bool) -> str | None:
        name = rel.rsplit("/", 1)[-1]
        if name == ".git":
            return "git"
        if self._git_ignored(rel, is_dir):
            return "gitignore"
        if self._repomem is not None and self._repomem.check(rel, is_dir):
            return "repomemignore"
        if self._extra is not None and self._extra.check(rel, is_dir):
            return "extra_ignore"
        if _vendored(name, is_dir) and rel not in self._entry_dirs:
            return "vendored"
        if not is_dir and secret_name(rel):
            return "secret_name"
        return None

    def reason(self, rel_path: str, is_dir: bool = False) -> str | None:
        """Why `rel_path` (posix, relative to the root) is skipped by name alone, or None.

        A path inside a skipped folder gets the folder's reason. `git` means inside `.git/`.
        """
        rel = rel_path.strip("/")
        if not rel or rel == ".":
            return None
        key = (rel, is_dir)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        parts = rel.split("/")
        found: str | None = None
        for i in range(1, len(parts)):
            found = self.reason("/".join(parts[:i]), True)
            if found:
                break
        if found is None:
            with self._lock:
                found = self._own_reason(rel, is_dir)
        with self._lock:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[key] = found
        return found


def _inside(path: Path, root_real: Path) -> bool:
    try:
        path.relative_to(root_real)
        return True
    except ValueError:
        return False


def is_unicode_name(name: str) -> bool:
    """Whether a file name is text: undecodable bytes come back from the OS as lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _symlink_reason(abs_path: Path, root_real: Path) -> str:
    try:
        target = abs_path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports link loops this way
        return "symlink_loop"
    except OSError as exc:
        return "symlink_loop" if exc.errno == 40 else "symlink_outside"  # ELOOP / dangling
    if not _inside(target, root_real):
        return "symlink_outside"
    if target.is_dir() and _inside(abs_path.parent.resolve(), target):
        return "symlink_loop"  # points at one of its own ancestors
    return "symlink"


def load_file(
    root: str | os.PathLike[str],
    rel_path: str,
    *,
    rules: IgnoreRules | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> RepoFile | Skip:
    """Everything the walk decides about one file, for the watcher: a RepoFile or the Skip."""
    root_p = Path(root)
    root_real = root_p.resolve()
    rel = rel_path.strip("/")
    if rules is not None:
        why = rules.reason(rel, False)
        if why:
            return Skip(rel, why)
    # The walk never enters a linked folder; a path named directly must not pass through one (or `..`).
    folder = (root_p / rel).parent
    lexical = root_real.joinpath(*PurePosixPath(rel).parent.parts)
    try:
        real = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        return Skip(rel, "unreadable")
    if real != lexical:
        return Skip(rel, "symlink" if _inside(real, root_real) and ".." not in PurePosixPath(rel).parts
                    else "symlink_outside")
    return _load(root_p, root_real, rel, max_file_bytes)


def _load(root: Path, root_real: Path, rel: str, max_file_bytes: int) -> RepoFile | Skip:
    abs_path = root / rel
    try:
        st = os.lstat(abs_path)
    except OSError:
        return Skip(rel, "unreadable")
    if stat.S_ISLNK(st.st_mode):
        return Skip(rel, _symlink_reason(abs_path, root_real))
    if not stat.S_ISREG(st.st_mode):
        return Skip(rel, "unreadable")  # sockets, fifos, devices
    if st.st_size > max_file_bytes:
        return Skip(rel, "too_large")
    language = language_for(rel)
    if PurePosixPath(rel).suffix.lower() in BINARY_EXTS or PurePosixPath(rel).name in BINARY_EXTS:
        return Skip(rel, "binary")
    try:
        with open(abs_path, "rb") as fh:
            data = fh.read(max_file_bytes + 1)
    except OSError:
        return Skip(rel, "unreadable")
    if len(data) > max_file_bytes:  # grew since the stat
        return Skip(rel, "too_large")
    try:
        text = decode_text(data, abs_path)
    except NotTextError as exc:
        return Skip(rel, exc.reason)
    if secret_in_text(text, language):
        return Skip(rel, "secret_content")
    if len(text) > MAX_LINE_CHARS and max(map(len, text.split("\n"))) > MAX_LINE_CHARS:
        return Skip(rel, "minified")
    return RepoFile(
        rel=rel,
        abs=abs_path,
        size=len(data),
        mtime=st.st_mtime,
        language=language,
        sha256=hashlib.sha256(data).hexdigest(),
        text=text,
    )


def walk_repo(
    root: str | os.PathLike[str],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    extra_ignores: Iterable[str] = (),
    rules: IgnoreRules | None = None,
) -> WalkResult:
    """Every file of the repository that becomes memory, and every skip with its reason.

    Order is deterministic (sorted, depth-first) so two walks of the same tree agree.
    """
    root_p = Path(root)
    root_real = root_p.resolve()
    if rules is None:
        rules = IgnoreRules(root_p, extra_ignores)
    result = WalkResult()
    stack: list[str] = [""]
    while stack:
        dir_rel = stack.pop()
        folder = root_p / dir_rel if dir_rel else root_p
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if dir_rel:
                result.skipped.append(Skip(dir_rel + "/", "unreadable"))
            continue
        subdirs: list[str] = []
        for entry in entries:
            rel = f"{dir_rel}/{entry.name}" if dir_rel else entry.name
            if entry.name == ".git":
                continue
            if not is_unicode_name(entry.name):  # bytes no encoding explains: the store cannot hold the path
                try:
                    slash = "/" if entry.is_dir(follow_symlinks=False) else ""
                except OSError:
                    slash = ""
                result.skipped.append(Skip(rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + slash,
                                           "encoding"))
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = not is_link and entry.is_dir(follow_symlinks=False)
            except OSError:
                result.skipped.append(Skip(rel, "unreadable"))
                continue
            if is_link:
                link_is_dir = False
                try:
                    link_is_dir = entry.is_dir(follow_symlinks=True)
                except OSError:
                    pass
                why = rules.reason(rel, link_is_dir) or _symlink_reason(root_p / rel, root_real)
                result.skipped.append(Skip(rel + ("/" if link_is_dir else ""), why))
                continue
            why = rules.reason(rel, is_dir)
            if why:
                if why != "git":
                    result.skipped.append(Skip(rel + ("/" if is_dir else ""), why))
                continue
            if is_dir:
                subdirs.append(rel)
                continue
            got = _load(root_p, root_real, rel, max_file_bytes)
            if isinstance(got, Skip):
                result.skipped.append(got)
            else:
                result.files.append(got)
        stack.extend(reversed(subdirs))
    return result
