"""Untrusted files and strings: pickles that would run code are refused, our artifacts are only safetensors + JSON,
exports never overwrite without --force (nor, even with it, anything prolip did not write), and no user string ever
reaches a shell.
"""

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from prolip.backbones import BackboneLoadError, load_backbone
from prolip.run import Run, RunError

from .conftest import cli, fit_cli, make_folder

pytestmark = pytest.mark.reliability("safety")

SRC = Path(__file__).resolve().parents[2] / "src" / "prolip"


class SystemCall:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecCall:
    """Unpickling this runs arbitrary Python (no shell involved)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def evil_pickles(tmp_path: Path) -> list[tuple[Path, Path]]:
    """(checkpoint, marker) pairs: each checkpoint would create its marker if it were ever unpickled."""
    out = []
    for name, payload in (("system.pt", SystemCall), ("exec.bin", ExecCall), ("wrapped.pth", SystemCall)):
        marker = tmp_path / f"MARKER_{name}"
        obj = payload(marker)
        torch.save({"state_dict": {"visual.proj": obj}} if name.startswith("wrapped") else obj, tmp_path / name)
        out.append((tmp_path / name, marker))
    # The payloads really do run when unpickled without weights_only: the marker checks below can fail.
    probe = tmp_path / "probe_marker"
    torch.save(SystemCall(probe), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    return out


def markers_in(root: Path) -> list[Path]:
    """Files a payload created (test inputs only ever contain MARKER inside a longer name)."""
    return sorted(p for p in root.rglob("MARKER*"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run fitted once through the CLI, with its feature cache."""
    root = tmp_path_factory.mktemp("safety_run")
    data = make_folder(root / "data", per_class=4)
    r = fit_cli(data, root / "run", root / "cache", shots=2, views=2, steps=5)
    assert r.exit_code == 0, r.output
    return root / "run"


# ---- pickles -----------------------------------------------------------------------------------------------------


def test_malicious_pickle_checkpoints_are_refused_and_never_run(tmp_path, tally):
    for checkpoint, marker in evil_pickles(tmp_path):
        with tally.raises(
            BackboneLoadError,
            match=rf"refusing to load {checkpoint}: .*would run code",
            input=f"pickle with code: {checkpoint.name}",
        ):
            load_backbone("test-vit-tiny", str(checkpoint))
        assert not marker.exists()
    assert markers_in(tmp_path) == []


def test_malicious_pickle_through_the_cli_is_a_clean_refusal(tmp_path, tally):
    data = make_folder(tmp_path / "data", per_class=2)
    for checkpoint, marker in evil_pickles(tmp_path):
        r = cli(
            "extract",
            "--data",
            data,
            "--views",
            1,
            "--cache-dir",
            tmp_path / "cache",
            "--model",
            "test-vit-tiny",
            "--pretrained",
            checkpoint,
        )
        tally.cli_error(r, rf"refusing to load {checkpoint}", "safetensors", input=f"--pretrained {checkpoint.name}")
        assert not marker.exists()
    assert markers_in(tmp_path) == [] and not (tmp_path / "cache").exists()


def test_malicious_pickle_in_a_hugging_face_directory_is_refused(tmp_path, tiny_hf_dir, tally):
    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, model_dir)
    (model_dir / "model.safetensors").unlink()  # leaves transformers only the pickled weights to read
    marker = tmp_path / "MARKER_hf"
    torch.save({"vision_model.embeddings.patch_embedding.weight": SystemCall(marker)}, model_dir / "pytorch_model.bin")
    data = make_folder(tmp_path / "data", per_class=2)
    r = cli("extract", "--data", data, "--views", 1, "--cache-dir", tmp_path / "cache", "--model", f"hf:{model_dir}")
    tally.cli_error(r, rf"refusing to load {model_dir / 'pytorch_model.bin'}", input="pickle in an hf: directory")
    assert not marker.exists()


def test_run_artifacts_are_only_safetensors_and_json(tiny_run, tally):
    cache = tiny_run.parent / "cache"
    files = [p for root in (tiny_run, cache) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".json" for p in files)
    for p in files:
        if p.name == "README.md" and p.parent == tiny_run:  # the run card: UTF-8 text for people, never read back
            p.read_text(encoding="utf-8")
            continue
        # Each file parses as what its name says, so none of them is a pickle or a torch.save zip in disguise.
        assert p.suffix in (".safetensors", ".json"), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            raw = p.read_bytes()
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors: u64 size + JSON
            assert isinstance(header, dict)
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys())
    tally.input(*(f"artifact {p.name}" for p in files))
    tally.handled_ok("every artifact is safetensors or JSON")


def test_a_tampered_run_is_a_clear_run_error_and_never_unpickled(tiny_run, tmp_path, tally):
    marker = tmp_path / "MARKER_run"
    tampered = {
        "method.safetensors": lambda p: torch.save({"W": SystemCall(marker)}, p),
        "classifier.safetensors": lambda p: p.write_bytes(os.urandom(64)),
        "manifest.json": lambda p: torch.save(SystemCall(marker), p),
        "classnames.json": lambda p: p.write_bytes(b"\xff\xfe not utf-8"),
    }
    for name, tamper in tampered.items():
        run = tmp_path / name.replace(".", "_")
        shutil.copytree(tiny_run, run)
        tamper(run / name)
        with tally.raises(
            RunError, match=rf"{run / name} is not (a )?valid (safetensors|JSON).*damaged", input=f"tampered {name}"
        ):
            Run.load(run)
        image = next((tiny_run.parent / "data" / "cat").iterdir())
        tally.cli_error(cli("predict", run, image), rf"{run / name}", "damaged", input=f"predict with tampered {name}")
    assert not marker.exists()


def test_a_run_pointing_at_a_malicious_checkpoint_is_refused(tiny_run, tmp_path, tally):
    (checkpoint, marker), *_ = evil_pickles(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["backbone"]["weights"] = str(checkpoint)  # a shared run whose manifest names a pickle
    (run / "manifest.json").write_text(json.dumps(manifest))
    image = next((tiny_run.parent / "data" / "cat").iterdir())
    tally.cli_error(cli("predict", run, image), rf"refusing to load {checkpoint}", input="run naming a pickle")
    assert not marker.exists()


# ---- export never overwrites ---------------------------------------------------------------------------------------


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_export_refuses_to_overwrite_without_force(tiny_run, tmp_path, tally):
    existing_dir, existing_file = tmp_path / "exported", tmp_path / "a_file"
    existing_dir.mkdir()
    (existing_dir / "keep.txt").write_text("mine")
    existing_file.write_text("also mine")
    for out in (existing_dir, existing_file):
        for force in ([], ["--force"]):  # a folder prolip did not write is refused even with --force
            before = digest(out)
            r = cli("export", tiny_run, "--out", out, *force)
            expected = "not empty and not written by prolip" if out.is_dir() else "it exists and is a file"
            tally.cli_error(r, rf"{out}", expected, input=f"export {' '.join(force)} over {out.name}")
            assert tally.lost(int(digest(out) != before)) == 0  # not a byte changed, nothing added
    fresh = tmp_path / "fresh"
    r = cli("export", tiny_run, "--out", fresh)
    assert r.exit_code == 0, r.output
    written = digest(fresh)
    r = cli("export", tiny_run, "--out", fresh)  # the export itself is protected the same way
    tally.cli_error(r, "already exists; pass --force", input="export over an export")
    assert tally.lost(int(digest(fresh) != written)) == 0
    r = cli("export", tiny_run, "--out", fresh, "--force")  # ... and --force replaces what prolip wrote
    assert r.exit_code == 0 and digest(fresh).keys() == written.keys(), r.output


# ---- no shell ------------------------------------------------------------------------------------------------------

SHELL_FUNCTIONS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("pty", "spawn"),
}


def shell_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that hand a string to a shell or an interpreter: os.system/popen/exec*/spawn*, shell=True, eval/exec."""
    found = []
    imported = {}  # from os import system as run → run: ("os", "system")
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (
            (f.value.id, f.attr)
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
            else imported.get(f.id, (None, f.id))
            if isinstance(f, ast.Name)
            else (None, None)
        )
        where = f"{filename}:{node.lineno}"
        if name in SHELL_FUNCTIONS or (name[0] == "os" and name[1].startswith(("exec", "spawn"))):
            found.append(f"{where} {name[0]}.{name[1]}")
        elif name in ((None, "eval"), (None, "exec")):
            found.append(f"{where} {name[1]}()")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where} shell={ast.unparse(kw.value)}")
    return found


def test_the_shell_call_check_finds_each_kind_of_call():
    bad = (
        "import os, subprocess\nfrom os import popen as p\nos.system('x')\np('x')\nos.execvp('sh', [])\n"
        "subprocess.run('x', shell=True)\nsubprocess.run(['x'], shell=flag)\neval('1')\n"
        "subprocess.run(['ls'], shell=False)\nmodel.eval()\n"
    )
    assert [c.split(" ", 1)[1] for c in shell_calls(bad)] == [
        "os.system",
        "os.popen",
        "os.execvp",
        "shell=True",
        "shell=flag",
        "eval()",
    ]


def test_no_source_file_hands_a_string_to_a_shell(tally):
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [c for f in files for c in shell_calls(f.read_text(), str(f.relative_to(SRC.parent)))]
    tally.input(f"{len(files)} source files")
    assert found == []


def test_shell_metacharacters_in_paths_and_class_names_stay_plain_strings(tmp_path, monkeypatch, tally):
    monkeypatch.chdir(tmp_path)  # a relative `touch MARKER` would land here
    names = ["; touch MARKER1", "$(touch MARKER2)", "`touch MARKER3`", "| touch MARKER4 &&"]
    data = make_folder(tmp_path / f"data{names[0]}", classes=names[1:], per_class=3)
    run, out = tmp_path / f"run {names[1]}", tmp_path / f"export{names[3]}"
    tally.input(*(f"path/class name {n!r}" for n in names))
    r = fit_cli(data, run, tmp_path / f"cache{names[2]}", shots=1, views=1, steps=2)
    assert r.exit_code == 0, r.output
    assert json.loads((run / "classnames.json").read_text()) == sorted(names[1:])  # passed through verbatim
    image = tmp_path / f"img {names[1]}.jpg"
    shutil.copy(next((data / names[1]).iterdir()), image)
    r = cli("predict", run, image, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["image"] == str(image), r.output
    r = cli("export", run, "--out", out)
    assert r.exit_code == 0 and (out / "open_clip_model.safetensors").is_file(), r.output
    assert markers_in(tmp_path) == []
    tally.handled_ok("no shell ran")
