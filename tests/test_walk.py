"""Repository walk: every skip has a reason, nothing raises, ignore rules behave like git."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from repomem.core.walk import (
    IgnoreRules,
    NotTextError,
    RepoFile,
    Skip,
    decode_text,
    language_for,
    load_file,
    secret_in_text,
    secret_name,
    walk_repo,
)

REPO = Path(__file__).resolve().parents[1]

# Built from pieces so that this test file itself does not look like it holds secrets.
PRIVATE_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n"
AWS_KEY = "AKIA" + "Z7Q2X9K4M1B8C3D5"
GH_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


def write(root: Path, rel: str, content: str | bytes = "x = 1\n") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def reasons(result) -> dict[str, str]:
    return {s.rel: s.reason for s in result.skipped}


def rels(result) -> list[str]:
    return [f.rel for f in result.files]


def test_walk_basic_fields_and_order(tmp_path: Path) -> None:
    write(tmp_path, "b.py", "print('b')\r\nprint(2)\r\n")
    write(tmp_path, "a/z.ts", "export const z = 1;\n")
    write(tmp_path, "a/y.md", "# Title\n")
    write(tmp_path, "notes", "plain words\n")
    res = walk_repo(tmp_path)
    assert rels(res) == ["b.py", "notes", "a/y.md", "a/z.ts"]  # files of a folder, then its subfolders
    b = res.files[0]
    assert isinstance(b, RepoFile)
    assert b.language == "python" and b.abs == tmp_path / "b.py" and b.path == b.rel == "b.py"
    assert b.text == "print('b')\nprint(2)\n"  # newlines normalised
    assert b.size == len((tmp_path / "b.py").read_bytes())
    import hashlib

    assert b.sha256 == hashlib.sha256((tmp_path / "b.py").read_bytes()).hexdigest()
    assert b.mtime == pytest.approx((tmp_path / "b.py").stat().st_mtime)
    assert res.files[1].language is None
    assert res.skipped == []
    assert walk_repo(tmp_path) == res  # deterministic


def test_language_map() -> None:
    cases = {
        "x.py": "python",
        "x.mjs": "javascript",
        "x.cjs": "javascript",
        "x.jsx": "javascript",
        "x.ts": "typescript",
        "x.tsx": "tsx",
        "x.go": "go",
        "x.rs": "rust",
        "x.java": "java",
        "x.c": "c",
        "x.h": "c",
        "x.cc": "cpp",
        "x.cpp": "cpp",
        "x.cxx": "cpp",
        "x.hpp": "cpp",
        "x.hh": "cpp",
        "x.md": "markdown",
        "x.toml": "toml",
        "x.yaml": "yaml",
        "x.yml": "yaml",
        "x.json": "json",
        "x.ini": "ini",
        "x.cfg": "ini",
        "x.rst": "text",
        "x.txt": "text",
        "Makefile": "make",
        "a/Dockerfile": "dockerfile",
        "x.unknownext": None,
        "README": None,
    }
    for name, lang in cases.items():
        assert language_for(name) == lang, name


def test_gitignore_root_nested_and_negation(tmp_path: Path) -> None:
    write(tmp_path, ".gitignore", "*.log\n!keep.log\nout/\n/rootonly.txt\n")
    write(tmp_path, "a.log", "x")
    write(tmp_path, "keep.log", "x")
    write(tmp_path, "out/gen.py")
    write(tmp_path, "rootonly.txt", "x")
    write(tmp_path, "sub/rootonly.txt", "x")  # anchored pattern: only the root one
    write(tmp_path, "sub/.gitignore", "/local.py\n*.tmp\n!important.log\n")
    write(tmp_path, "sub/local.py")
    write(tmp_path, "sub/deeper/local.py")  # anchored to sub/, so this one stays
    write(tmp_path, "sub/x.tmp", "x")
    write(tmp_path, "sub/important.log", "x")  # nested negation beats the root pattern
    write(tmp_path, "local.py")  # the nested .gitignore does not apply above its folder
    res = walk_repo(tmp_path)
    why = reasons(res)
    assert why["a.log"] == "gitignore"
    assert why["out/"] == "gitignore"
    assert why["rootonly.txt"] == "gitignore"
    assert why["sub/local.py"] == "gitignore"
    assert why["sub/x.tmp"] == "gitignore"
    kept = set(rels(res))
    assert {"keep.log", "sub/rootonly.txt", "sub/deeper/local.py", "sub/important.log", "local.py"} <= kept
    assert ".gitignore" in kept and "sub/.gitignore" in kept
    # a skipped folder is one entry: its contents are not listed
    assert not any(r.startswith("out/") and r != "out/" for r in why)


@pytest.mark.parametrize(("ignore", "kept"), [
    # "ignore everything but Python": `!*/` keeps every folder open (what `git status` shows)
    ("*\n!*/\n!*.py\n", ["c.py", "docs/api/x.py", "src/a.py", "src/deep/d.py"]),
    ("docs/**\n!docs/**/\n!docs/**/*.md\n", ["c.py", "docs/api/ref.md", "docs/guide.md", "src/a.py",
                                              "src/deep/d.py", "x.txt"]),
    # a file cannot come back from inside an ignored folder (each list is what `git status` shows)
    ("src/\n!src/a.py\n", ["c.py", "docs/api/ref.md", "docs/api/x.py", "docs/guide.md", "x.txt"]),
])
def test_gitignore_folders_take_the_last_pattern_that_matches(tmp_path: Path, ignore: str, kept: list[str]) -> None:
    for f in ("c.py", "x.txt", "src/a.py", "src/deep/d.py", "docs/guide.md", "docs/api/ref.md", "docs/api/x.py"):
        write(tmp_path, f)
    write(tmp_path, ".gitignore", ignore)
    assert sorted(r for r in rels(walk_repo(tmp_path)) if r != ".gitignore") == kept


def test_git_info_exclude_and_git_dir_silent(tmp_path: Path) -> None:
    write(tmp_path, ".git/info/exclude", "secret_dir/\n")
    write(tmp_path, ".git/config", "[core]\n")
    write(tmp_path, "secret_dir/a.py")
    write(tmp_path, "a.py")
    res = walk_repo(tmp_path)
    assert rels(res) == ["a.py"]
    assert reasons(res) == {"secret_dir/": "gitignore"}
    assert IgnoreRules(tmp_path).reason(".git/config") == "git"


def test_repomemignore_and_extra_ignores(tmp_path: Path) -> None:
    write(tmp_path, ".repomemignore", "docs/\n*.sql\n")
    write(tmp_path, "docs/a.md", "# a\n")
    write(tmp_path, "schema.sql", "create table t(x int);\n")
    write(tmp_path, "fixtures/big.json", "{}\n")
    write(tmp_path, "src/main.py")
    res = walk_repo(tmp_path, extra_ignores=["fixtures/"])
    assert reasons(res) == {"docs/": "repomemignore", "schema.sql": "repomemignore", "fixtures/": "extra_ignore"}
    assert rels(res) == [".repomemignore", "src/main.py"]


def test_vendored(tmp_path: Path) -> None:
    for d in [
        "node_modules",
        "vendor",
        "third_party",
        "dist",
        "build",
        ".venv",
        "venv",
        "__pycache__",
        ".tox",
        ".mypy_cache",
        "lib/site-packages",
        "pkg.egg-info",
    ]:
        write(tmp_path, f"{d}/x.py")
    for f in ["app.min.js", "package-lock.json", "yarn.lock", "poetry.lock", "Cargo.lock", "web/go.sum"]:
        write(tmp_path, f, "x\n")
    write(tmp_path, "app.js", "let a = 1;\n")
    res = walk_repo(tmp_path)
    why = reasons(res)
    assert rels(res) == ["app.js"]
    assert set(why.values()) == {"vendored"}
    assert "node_modules/" in why and "lib/site-packages/" in why and "app.min.js" in why and "web/go.sum" in why


def test_a_packages_declared_entry_points_are_code_even_in_build_or_dist(tmp_path: Path) -> None:
    # a published npm package ships its readable code in build/: its package.json says so
    manifest = {"name": "p", "main": "./build/index.cjs",
                "exports": {".": [{"import": "./build/lib/index.js"}, "./build/index.cjs"]},
                "bin": {"p": "./bin/p.js"}}
    write(tmp_path, "package.json", json.dumps(manifest))
    write(tmp_path, "build/lib/index.js", "export const a = 1;\n")
    write(tmp_path, "build/index.cjs", "exports.a = 1;\n")
    write(tmp_path, "dist/other.js", "let b = 2;\n")
    write(tmp_path, "build/lib/node_modules/dep/x.js", "let c = 3;\n")
    res = walk_repo(tmp_path)
    assert sorted(rels(res)) == ["build/index.cjs", "build/lib/index.js", "package.json"]
    assert reasons(res) == {"dist/": "vendored", "build/lib/node_modules/": "vendored"}
    # without the declaration build/ is output like any other
    write(tmp_path, "package.json", json.dumps({"name": "p", "main": "index.js"}))
    assert "build/" in reasons(walk_repo(tmp_path))
    write(tmp_path, "package.json", "{not json")
    assert "build/" in reasons(walk_repo(tmp_path))


def test_secret_names(tmp_path: Path) -> None:
    secret_files = [
        ".env",
        ".env.local",
        ".env.production",
        "certs/server.pem",
        "tls.key",
        "id_rsa",
        "id_rsa.pub",
        "id_ed25519",
        "store.p12",
        "cert.pfx",
        "credentials",
        "credentials.json",
        "config/client_secret.json",
        "secrets.yaml",
        ".npmrc",
        ".pypirc",
        ".netrc",
        "release.keystore",
        ".envrc",
        "deploy/production.env",
        ".env_local",
        ".pgpass",
        ".s3cfg",
        "putty/server.ppk",
    ]
    for f in secret_files:
        write(tmp_path, f, "harmless\n")
    for template in (".env.example", ".env_sample", ".env-template", "example.env"):
        write(tmp_path, template, "API_URL=\n")
    write(tmp_path, "app/secrets.py", "def load_secret(name):\n    return None\n")
    res = walk_repo(tmp_path)
    why = reasons(res)
    for f in secret_files:
        assert why.get(f) == "secret_name", f
    assert {".env.example", ".env_sample", ".env-template", "example.env", "app/secrets.py"} <= set(rels(res))
    assert secret_name("deploy/Secret_Config.yml") and not secret_name("src/secret_store.rs")


def test_secret_content(tmp_path: Path) -> None:
    write(tmp_path, "k.txt", "notes\n" + PRIVATE_KEY)
    write(tmp_path, "aws.py", f'KEY = "{AWS_KEY}"\n')
    write(tmp_path, "gh.sh", f"export TOKEN={GH_TOKEN}\n")
    write(tmp_path, "slack.cfg", "hook = xox" + "b-1234567890-abcdefghij\n")
    write(tmp_path, "settings.py", 'SECRET_KEY = "' + "f9a8s7d6f5g4h3j2k1l0" + '"\n')
    write(tmp_path, "conf.json", '{"password": "' + "Zq3xW8pL2vN7mK4r" + '"}\n')
    write(
        tmp_path,
        "ok.py",
        'token_type = "access_token_header"\npassword = "changeme"\napi_key = "sk-' + "x" * 40 + '"\n',
    )
    # values without quotes, where configuration files write them, and base64 with its padding
    write(tmp_path, "deploy.yaml", "service:\n  api_key: " + "9f8a7b6c5d4e3f2a1b0c" + "\n")
    write(tmp_path, "aws.ini", "[default]\naws_secret_access_key = " + "wJalrXUtnFEMI7K7MDENGbPxRfiCY" + "\n")
    write(tmp_path, "run.sh", "export API_TOKEN=" + "Zq3xW8pL2vN7mK4rT6" + "\n")
    write(tmp_path, "compose.yml", "environment:\n  POSTGRES_PASSWORD: " + "pG7kQ2xW9mZ4vL8n" + "\n")
    write(tmp_path, "b64.py", 'SECRET = "' + "c2VjcmV0LXZhbHVlLTEyMzQ1Ng" + '=="\n')
    # code that names a setting without a value stays
    write(tmp_path, "client.py", "api_key = settings_v2_api_key_lookup\ntoken = os.environ['TOKEN']\n")
    res = walk_repo(tmp_path)
    why = reasons(res)
    for f in ["k.txt", "aws.py", "gh.sh", "slack.cfg", "settings.py", "conf.json", "deploy.yaml", "aws.ini",
              "run.sh", "compose.yml", "b64.py"]:
        assert why.get(f) == "secret_content", f
    assert rels(res) == ["client.py", "ok.py"]
    assert secret_in_text("nothing here") is None
    assert secret_in_text("The deploy key is api_key = " + "q8Xz4T7kP2mN9vB3cR6w") == "assignment"  # a note


def test_binary_encoding_bom_and_size(tmp_path: Path) -> None:
    write(tmp_path, "blob.dat", b"abc\x00def")
    write(tmp_path, "image.png", b"not even an image")
    write(tmp_path, "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    write(tmp_path, "bom.py", b"\xef\xbb\xbfx = 1\n")
    write(tmp_path, "big.py", "x = 1\n" * 100)
    write(tmp_path, "small.py", "y = 2\n")
    res = walk_repo(tmp_path, max_file_bytes=300)
    why = reasons(res)
    assert why == {"blob.dat": "binary", "image.png": "binary", "latin1.txt": "encoding", "big.py": "too_large"}
    bom = next(f for f in res.files if f.rel == "bom.py")
    assert bom.text == "x = 1\n"
    assert res.counts_by_reason() == {"binary": 2, "encoding": 1, "too_large": 1}
    with pytest.raises(NotTextError, match="binary"):  # a NUL past the first few KiB says binary too
        decode_text(b"x = 1\n" * 2000 + b"\x00")


def test_utf16_with_a_byte_order_mark_is_text(tmp_path: Path) -> None:
    source = "# Windows resource strings\r\nGREETING = \"caf\u00e9\"\r\n"
    write(tmp_path, "le.py", source.encode("utf-16"))  # Python writes the native (little-endian) BOM
    write(tmp_path, "be.ps1", b"\xfe\xff" + source.encode("utf-16-be"))
    write(tmp_path, "odd.txt", b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00")  # a dangling byte
    write(tmp_path, "wide.txt", "x = 1\n".encode("utf-32"))  # FF FE 00 00: not UTF-16
    write(tmp_path, "no_bom.txt", "x = 1\n".encode("utf-16-le"))  # no mark: NULs, so binary
    res = walk_repo(tmp_path)
    texts = {f.rel: f.text for f in res.files}
    assert texts == {"le.py": '# Windows resource strings\nGREETING = "caf\u00e9"\n',
                     "be.ps1": '# Windows resource strings\nGREETING = "caf\u00e9"\n'}
    assert reasons(res) == {"odd.txt": "encoding", "wide.txt": "binary", "no_bom.txt": "binary"}


def test_a_file_with_a_generated_line_is_skipped_as_minified(tmp_path: Path) -> None:
    from repomem.core.walk import MAX_LINE_CHARS

    dump = ",".join(f'{{"id": {i}}}' for i in range(MAX_LINE_CHARS // 8))
    write(tmp_path, "data.json", "{\"items\": [" + dump + "]}\n")
    write(tmp_path, "bundle.js", "var a = 1;\n" + "f(" * (MAX_LINE_CHARS // 2 + 1) + "\n")
    write(tmp_path, "wide.py", "x = '" + "a" * (MAX_LINE_CHARS - 10) + "'\n" * 3)  # long, but under the limit
    res = walk_repo(tmp_path)
    assert reasons(res) == {"data.json": "minified", "bundle.js": "minified"}
    assert [f.rel for f in res.files] == ["wide.py"]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the file system takes only Unicode names")
def test_file_names_that_are_not_utf8_are_skipped_not_fatal(tmp_path: Path, home: Path,
                                                             test_model_path: Path) -> None:
    from repomem.core import settings as settings_mod
    from repomem.core.memory import RepoMemory

    raw = os.fsencode(tmp_path)
    with open(os.path.join(raw, b"caf\xe9.py"), "w") as f:  # a Latin-1 name from an old archive
        f.write("x = 1\n")
    os.mkdir(os.path.join(raw, b"d\xe9j\xe0"))
    with open(os.path.join(raw, b"d\xe9j\xe0", b"mod.py"), "w") as f:
        f.write("y = 2\n")
    write(tmp_path, "ok.py", "def fine():\n    return 3\n")
    res = walk_repo(tmp_path)
    assert [f.rel for f in res.files] == ["ok.py"]
    assert reasons(res) == {"caf\ufffd.py": "encoding", "d\ufffdj\ufffd/": "encoding"}
    mem = RepoMemory.open(tmp_path, settings=settings_mod.Settings(model=str(test_model_path)))
    try:
        summary = mem.index(compile=False)  # the store and the skip list take the names too
        assert summary.files == 1 and summary.skipped.get("encoding") == 2
        assert [c.symbol for c in mem.search("fine")][:1] == ["fine"]
        # the watcher reports such a name as the OS decodes it
        assert mem.sync_paths([os.fsdecode(b"caf\xe9.py")], compile=False).skipped == {"encoding": 1}
    finally:
        mem.close()


def test_line_endings_and_decode(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", b"one\r\ntwo\rthree\n")
    loaded = load_file(tmp_path, "a.txt")
    assert isinstance(loaded, RepoFile) and loaded.text == "one\ntwo\nthree\n"
    from repomem.core.walk import NotTextError

    with pytest.raises(NotTextError) as err:
        decode_text(b"\x00\x01")
    assert err.value.reason == "binary"
    with pytest.raises(NotTextError) as err:
        decode_text(b"\xff\xfe\xfa")
    assert err.value.reason == "encoding"
    assert load_file(tmp_path, "missing.txt") == Skip("missing.txt", "unreadable")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlinks_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "private.py", "x = 1\n")
    root = tmp_path / "repo"
    write(root, "real/a.py")
    (root / "out_link").symlink_to(outside, target_is_directory=True)
    (root / "out_file.py").symlink_to(outside / "private.py")
    (root / "real" / "up").symlink_to(root, target_is_directory=True)  # loop to an ancestor
    (root / "dup").symlink_to(root / "real", target_is_directory=True)
    (root / "alias.py").symlink_to(root / "real" / "a.py")
    (root / "dangling.py").symlink_to(root / "nope.py")
    (root / "self").symlink_to(root / "self")  # a link loop that never resolves
    res = walk_repo(root)
    why = reasons(res)
    assert why["out_link/"] == "symlink_outside"
    assert why["out_file.py"] == "symlink_outside"
    assert why["real/up/"] == "symlink_loop"
    assert why["dup/"] == "symlink"
    assert why["alias.py"] == "symlink"
    assert why["dangling.py"] == "symlink_outside"
    assert why["self"] == "symlink_loop"
    assert rels(res) == ["real/a.py"]
    # one path at a time (the watcher, an excluded path): a link on the way or `..` leads nowhere either
    assert load_file(root, "out_link/private.py") == Skip("out_link/private.py", "symlink_outside")
    assert load_file(root, "dup/a.py") == Skip("dup/a.py", "symlink")
    assert load_file(root, "../outside/private.py") == Skip("../outside/private.py", "symlink_outside")
    assert isinstance(load_file(root, "real/a.py"), RepoFile)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs fifos")
def test_unreadable_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "ok.py")
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever
    write(tmp_path, "locked/a.py")
    write(tmp_path, "gone.py")
    import repomem.core.walk as walk_mod

    real_open = open

    def flaky_open(path, *a, **kw):  # a file that vanishes between listing and reading
        if str(path).endswith("gone.py"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(walk_mod, "open", flaky_open, raising=False)
    real_scandir = os.scandir

    def flaky_scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(path)
        return real_scandir(path)

    monkeypatch.setattr(walk_mod.os, "scandir", flaky_scandir)
    res = walk_repo(tmp_path)
    assert reasons(res) == {"pipe": "unreadable", "gone.py": "unreadable", "locked/": "unreadable"}
    assert rels(res) == ["ok.py"]


def test_ignore_rules_single_path_and_reload(tmp_path: Path) -> None:
    write(tmp_path, ".gitignore", "*.gen.py\n")
    write(tmp_path, "pkg/node_modules/x/index.js", "x\n")
    write(tmp_path, "pkg/a.gen.py")
    write(tmp_path, "pkg/b.py")
    rules = IgnoreRules(tmp_path)
    assert rules.reason("pkg/a.gen.py") == "gitignore"
    assert rules.reason("pkg/b.py") is None
    assert rules.reason("pkg/node_modules/x/index.js") == "vendored"  # inherits the folder's reason
    assert rules.reason(".env") == "secret_name"
    write(tmp_path, "pkg/.gitignore", "b.py\n")
    assert rules.reason("pkg/b.py") is None  # cached until reload
    rules.reload()
    assert rules.reason("pkg/b.py") == "gitignore"

    assert rules.reason("pkg/node_modules", is_dir=True) == "vendored"
    write(tmp_path, ".gitignore", "")
    rules.reload()
    assert rules.reason("pkg/a.gen.py") is None


def test_load_file_for_watcher(tmp_path: Path) -> None:
    write(tmp_path, ".gitignore", "ignored.py\n")
    write(tmp_path, "ignored.py")
    write(tmp_path, "good.py", "def f():\n    return 1\n")
    write(tmp_path, "bin.py", b"\x00\x00")
    rules = IgnoreRules(tmp_path)
    got = load_file(tmp_path, "good.py", rules=rules)
    assert isinstance(got, RepoFile) and got.language == "python" and "def f" in got.text
    assert load_file(tmp_path, "ignored.py", rules=rules) == Skip("ignored.py", "gitignore")
    assert load_file(tmp_path, "bin.py", rules=rules) == Skip("bin.py", "binary")
    assert load_file(tmp_path, "deleted.py", rules=rules) == Skip("deleted.py", "unreadable")


def test_walk_this_repository() -> None:
    res = walk_repo(REPO)
    names = set(rels(res))
    assert "core/walk.py" in names and "tests/test_walk.py" in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    assert all(isinstance(s, Skip) and s.reason for s in res.skipped)
