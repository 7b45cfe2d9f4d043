"""Every user mistake in a sweep file or a --set: one line, exit 2, naming where it came from and the key,
caught before anything is written or started, by `dlsweep run` and `dlsweep run --dry-run` alike."""

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlcore.cli import app
from test_spec import MINIMAL

runner = CliRunner()
TEXT = yaml.safe_dump(MINIMAL)
FOLDER = "a folder where the sweep file should be"


def change(**edits):
    """MINIMAL with dotted keys set (``finetune__lr=...`` for ``finetune.lr``), None deleting the key."""
    def apply(raw):
        for dotted, value in edits.items():
            *parents, last = dotted.split("__")
            node = raw
            for key in parents:
                node = node.setdefault(key, {})
            if value is None:
                del node[last]
            else:
                node[last] = value
    return apply


def rename(section: str, old: str, new: str):
    def apply(raw):
        node = raw
        for key in section.split("."):
            node = node[key]
        node[new] = node.pop(old)
    return apply


def classify_stage(raw):
    raw["pretrain"]["clf"] = {"objective": "classify", "labels": 100000, "steps": 10}


def sweep_bytes(sweep) -> bytes:
    if isinstance(sweep, bytes):
        return sweep
    raw = copy.deepcopy(MINIMAL)
    if sweep is not None:
        sweep(raw)
    return yaml.safe_dump(raw).encode()


def S(override: str) -> list[str]:
    return ["--set", override]


F = "study.yaml: "  # the error names the file ...


def FS(override: str) -> str:  # ... or the file and the --set the value came from
    return f"study.yaml --set {override}: "


BAD = [
    # ranges
    pytest.param(None, S("pretrain.ae.lr=-1"), FS("pretrain.ae.lr=-1") + "pretrain.ae.lr: Input should be greater than 0", id="lr<0"),
    pytest.param(change(pretrain__ae__lr=0), [], F + "pretrain.ae.lr: Input should be greater than 0", id="lr=0"),
    pytest.param(None, S("finetune.arms.pretrained.encoder_lr=0"), "finetune.arms.pretrained.encoder_lr: Input should be greater than 0", id="encoder_lr=0"),
    pytest.param(change(finetune__weight_decay=-0.1), [], F + "finetune.weight_decay: Input should be greater than or equal to 0", id="weight_decay<0"),
    pytest.param(None, S("pretrain.ae.batch_size=0"), "pretrain.ae.batch_size: Input should be greater than or equal to 1", id="batch_size=0"),
    pytest.param(None, S("finetune.eval_batch_size=0"), "finetune.eval_batch_size: Input should be greater than or equal to 1", id="eval_batch_size=0"),
    pytest.param(change(pretrain__ae__eval_every=0), [], F + "pretrain.ae.eval_every: Input should be greater than or equal to 1", id="eval_every=0"),
    pytest.param(None, S("pretrain.ae.steps=0"), "pretrain.ae.steps: Input should be greater than 0", id="stage steps=0"),
    pytest.param(None, S("finetune.steps=[0]"), "finetune.steps: step budgets must be positive", id="step budget 0"),
    pytest.param(None, S("pretrain.ae.proj_dim=0"), "pretrain.ae.proj_dim: Input should be greater than or equal to 1", id="proj_dim=0"),
    pytest.param(None, S("pretrain.ae.proj_hidden=0"), "pretrain.ae.proj_hidden: Input should be greater than or equal to 1", id="proj_hidden=0"),
    pytest.param(None, S("pretrain.ae.knn_bank=0"), "pretrain.ae.knn_bank: Input should be greater than or equal to 1", id="knn_bank=0"),
    pytest.param(None, S("pretrain.ae.recon_samples=0"), "pretrain.ae.recon_samples: Input should be greater than or equal to 1", id="recon_samples=0"),
    pytest.param(None, S("finetune.head_hidden=-1"), "finetune.head_hidden: Input should be greater than or equal to 0", id="head_hidden<0"),
    pytest.param(None, S("pretrain.ae.warmup_steps=-5"), "pretrain.ae.warmup_steps: Input should be greater than or equal to 0", id="warmup<0"),
    pytest.param(None, S("pretrain.ae.noise_std=-0.5"), "pretrain.ae.noise_std: Input should be greater than or equal to 0", id="noise_std<0"),
    pytest.param(None, S("pretrain.ae.temperature=0"), "pretrain.ae.temperature: Input should be greater than 0", id="temperature=0"),
    pytest.param(None, S("pretrain.ae.barlow_lambda=-1"), "pretrain.ae.barlow_lambda: Input should be greater than or equal to 0", id="barlow_lambda<0"),
    pytest.param(None, S("finetune.seeds=[-1]"), FS("finetune.seeds=[-1]") + "finetune.seeds.0: Input should be greater than or equal to 0", id="seed<0"),
    pytest.param(change(pretrain__ae__seeds=[2**32]), [], F + "pretrain.ae.seeds.0: Input should be less than 4294967296", id="stage seed>=2**32"),
    pytest.param(None, S("data.split_seed=-1"), "data.split_seed: Input should be greater than or equal to 0", id="split_seed<0"),
    pytest.param(None, S("data.val_size=0"), FS("data.val_size=0") + "data.val_size: val_size 0 must be a count >= 1 or a fraction in (0, 1)", id="val_size=0"),
    pytest.param(change(finetune=None, data__val_size=0), [], F + "data.val_size: val_size 0 must be", id="val_size=0 pretraining only"),
    pytest.param(None, S("data.val_size=1.0"), "data.val_size: val_size 1.0 must be a count >= 1 or a fraction in (0, 1)", id="val_size=1.0"),
    pytest.param(None, S("data.test_size=0"), "data.test_size: Input should be greater than or equal to 1", id="test_size=0"),
    pytest.param(None, S("finetune.labels=[0]"), "finetune.labels: label count 0 must be positive", id="budget 0"),
    pytest.param(change(finetune__labels=[20, 1.5]), [], F + "finetune.labels: label fraction 1.5 must be in (0, 1]", id="fraction>1"),
    pytest.param(None, S("pretrain.ae.labels=-3"), "pretrain.ae.labels: label count -3 must be positive", id="stage budget<0"),
    pytest.param(None, S("finetune.samples=0"), "finetune.samples: Input should be greater than 0", id="samples=0"),
    # NaN and infinity
    pytest.param(None, S("pretrain.ae.lr=.nan"), "pretrain.ae.lr: Input should be a finite number", id="lr=nan"),
    pytest.param(None, S("finetune.weight_decay=.inf"), "finetune.weight_decay: Input should be a finite number", id="weight_decay=inf"),
    pytest.param(change(pretrain__ae__noise_std=float("nan")), [], F + "pretrain.ae.noise_std: Input should be a finite number", id="noise_std=nan in file"),
    pytest.param(None, S("finetune.labels=[.nan]"), "finetune.labels: label fraction nan must be in (0, 1]", id="budget nan"),
    pytest.param(None, S("data.val_size=.inf"), "data.val_size: val_size inf must be", id="val_size=inf"),
    pytest.param(None, S("resources.cpu=.inf"), "resources.cpu: Input should be a finite number", id="cpu=inf"),
    # search distributions inside the parameter's range
    pytest.param(None, S("finetune.search.lr={uniform: [-1, 1]}"),
                 FS("finetune.search.lr={uniform: [-1, 1]}") + "finetune.search.lr: uniform value -1.0: Input should be greater than 0", id="search lr<0"),
    pytest.param(change(finetune__search={"weight_decay": {"uniform": [-0.1, 0.1]}}), [],
                 F + "finetune.search.weight_decay: uniform value -0.1: Input should be greater than or equal to 0", id="search wd<0"),
    pytest.param(None, S("finetune.search.batch_size={uniform: [16, 64]}"), "finetune.search.batch_size: uniform draws floats, but batch_size takes int", id="search float for int"),
    pytest.param(None, S("finetune.search.batch_size={choice: [0, 64]}"), "finetune.search.batch_size: choice value 0: Input should be greater than or equal to 1", id="search choice out of range"),
    pytest.param(None, S("finetune.search.head_hidden={randint: [-2, 8]}"), "finetune.search.head_hidden: randint value -2: Input should be greater than or equal to 0", id="search randint out of range"),
    pytest.param(None, S("finetune.search.encoder={choice: [conv, vit]}"), "finetune.search.encoder: choice value 'vit': encoder 'vit' is not one of", id="search unknown encoder"),
    pytest.param(None, S("finetune.search_scope=cells"), FS("finetune.search_scope=cells") + "finetune.search_scope: Input should be 'seed' or 'cell'", id="unknown search scope"),
    pytest.param(change(finetune__search_scope="cell", finetune__search={}), [],
                 F + "finetune.search_scope: cell shares the values the first seed's search picks, but finetune.search is empty", id="search scope cell without a search"),
    # encoder_args against the builders' signatures
    pytest.param(None, S("pretrain.ae.encoder_args.latnt_dim=8"),
                 FS("pretrain.ae.encoder_args.latnt_dim=8") + "pretrain.ae.encoder_args: unknown argument ['latnt_dim'] for encoder conv "
                 "and decoder conv; known: ['channels', 'fc_hidden', 'latent_dim']", id="encoder_args typo"),
    pytest.param(change(finetune__arms__scratch={"encoder_args": {"sigmoid": True}}), [],
                 F + "finetune.arms.scratch.encoder_args: unknown argument ['sigmoid'] for encoder conv; known:", id="decoder arg to an encoder"),
    pytest.param(None, S("finetune.encoder_args={hidden: [64]}"),
                 FS("finetune.encoder_args={hidden: [64]}") + "finetune.encoder_args: unknown argument ['hidden'] for encoder conv", id="args of another encoder"),
    pytest.param(None, S("finetune.encoder=mlp"), FS("finetune.encoder=mlp") + "finetune.arms.pretrained: encoder mlp {'latent_dim': 8} differs "
                 "from the encoder of stage 'ae' (conv {'latent_dim': 8})", id="arm encoder unlike its stage's"),
    pytest.param(None, S("pretrain.ae.encoder=resnet18"), FS("pretrain.ae.encoder=resnet18") + "pretrain.ae.decoder: no decoder 'resnet18'", id="autoencoder without decoder"),
    # a key given twice in the YAML
    pytest.param(b"name: first\n" + TEXT.encode() + b"name: second\n", [], F + "name: given twice, at lines 1 and 33", id="duplicate top-level key"),
    pytest.param(TEXT.replace("  samples: 3\n", "  samples: 3\n  samples: 4\n").encode(), [], F + "finetune.samples: given twice, at lines 14 and 15", id="duplicate nested key"),
    pytest.param(TEXT.replace("    steps: 30\n", "    steps: 30\n    steps: 60\n").encode(), [], F + "pretrain.ae.steps: given twice", id="duplicate stage key"),
    # a grid value given twice
    pytest.param(None, S("finetune.labels=[20, 20]"), "finetune.labels: [20] given more than once", id="repeated budget"),
    pytest.param(None, S("finetune.steps=[40, 40]"), "finetune.steps: [40] given more than once", id="repeated steps"),
    pytest.param(change(finetune__seeds=[0, 1, 0]), [], F + "finetune.seeds: [0] given more than once", id="repeated seed"),
    pytest.param(None, S("pretrain.ae.seeds=[1, 1]"), "pretrain.ae.seeds: [1] given more than once", id="repeated stage seed"),
    pytest.param(None, S("data.classes=[1, 2, 1]"), "data.classes: [1] given more than once", id="repeated class"),
    pytest.param(change(pretrain__ae__classes=[2, 3, 2]), [], F + "pretrain.ae.classes: [2] given more than once", id="repeated stage class"),
    # a key both set and searched
    pytest.param(None, S("finetune.lr=0.01"), FS("finetune.lr=0.01") + "finetune.lr: is set, and also searched by finetune.search.lr", id="set and searched"),
    pytest.param(change(finetune__arms__scratch={"lr": 0.01}), [], F + "finetune.arms.scratch.lr: is set, and also searched by finetune.search.lr", id="arm set and searched"),
    pytest.param(None, S("finetune.search.encoder_args={choice: [{latent_dim: 4}]}"),
                 FS("finetune.search.encoder_args={choice: [{latent_dim: 4}]}") + "finetune.encoder_args: is set, and also searched", id="search of a set key"),
    # names that would leave their folder
    pytest.param(None, S("name=a/b"), FS("name=a/b") + "name: 'a/b' is not a plain name", id="name with /"),
    pytest.param(None, S("name=../x"), "name: '../x' is not a plain name", id="name .."),
    pytest.param(change(name=".hidden"), [], F + "name: '.hidden' is not a plain name", id="name leading dot"),
    pytest.param(None, S("tracking.experiment=../../etc"), "tracking.experiment: '../../etc' is not a plain name", id="experiment .."),
    pytest.param(change(tracking={"experiment": "a/b"}), [], F + "tracking.experiment: 'a/b' is not a plain name", id="experiment with /"),
    pytest.param(rename("pretrain", "ae", "../ae"), [], F + "pretrain.../ae: '../ae' is not a plain name", id="stage name .."),
    pytest.param(rename("pretrain", "ae", ".ae"), [], "'.ae' is not a plain name", id="stage name leading dot"),
    pytest.param(rename("finetune.arms", "scratch", "a/b"), [], F + "finetune.arms.a/b: 'a/b' is not a plain name", id="arm name with /"),
    pytest.param(rename("finetune.arms", "scratch", ".."), [], "'..' is not a plain name", id="arm name .."),
    # files that cannot be read
    pytest.param(TEXT.encode() + b"description: caf\xe9\n", [], F + "not UTF-8 text (byte 0xe9", id="not UTF-8"),
    pytest.param(FOLDER, [], F + "is a folder, not a sweep file", id="folder"),
    pytest.param(None, S("finetune.lr"), FS("finetune.lr") + "expected KEY.PATH=VALUE", id="--set without ="),
    pytest.param(None, S("data.data_dir=[/x]"), FS("data.data_dir=[/x]") + "data.data_dir: Input should be a valid string", id="markup in value"),
    # the data set itself
    pytest.param(None, S("data.data_dir=truncated"), F + "data.dataset: truncated/mnist.npz: not a readable .npz, truncated or corrupt? (BadZipFile", id="truncated npz"),
    pytest.param(None, S("data.data_dir=empty"), F + "data.dataset: empty/mnist.npz: not a readable .npz, truncated or corrupt? (EOFError", id="empty npz"),
    pytest.param(None, S("data.dataset=svhn"), FS("data.dataset=svhn") + "data.dataset: data set 'svhn' not found", id="unknown data set"),
    pytest.param(None, S("data.dataset=/nowhere/x.npz"), "data.dataset: data set file /nowhere/x.npz does not exist", id="missing npz path"),
    pytest.param(None, S("data.classes=[1, 10]"), FS("data.classes=[1, 10]") + "data.classes: classes [10] not in mnist (labels 0..9)", id="class out of range"),
    pytest.param(change(pretrain__ae__classes=[3, 11]), [], F + "pretrain.ae.classes: classes [11] not in mnist (labels 0..9)", id="stage class out of range"),
    pytest.param(None, S("data.classes=[-1, 2]"), "data.classes.0: Input should be greater than or equal to 0", id="negative class"),
    pytest.param(None, S("finetune.labels=[100000]"),
                 FS("finetune.labels=[100000]") + "finetune.labels: label budget 100000 (100000 labels) exceeds the 59500 training images", id="budget > pool"),
    pytest.param(None, S("finetune.labels=[5]"), "finetune.labels: label budget 5 (5 labels) is smaller than the number of classes (10)", id="budget < classes"),
    pytest.param(None, S("finetune.labels=[0.0001]"), "finetune.labels: label budget 0.0001 (6 labels) is smaller than the number of classes", id="fraction < classes"),
    pytest.param(change(data__classes=[3, 5], finetune__labels=[20000]), [], F + "finetune.labels: label budget 20000 (20000 labels) exceeds", id="budget > pool of classes"),
    pytest.param(classify_stage, [], F + "pretrain.clf.labels: label budget 100000 (100000 labels) exceeds", id="stage budget > pool"),
    pytest.param(None, S("finetune.labels=[15]"), FS("finetune.labels=[15]") + "finetune.labels: label budget 15 (15 labels) "
                 "leaves class", id="realistic budget < 2 per class"),
    pytest.param(None, S("validation.protocol=guess"), "validation.protocol: Input should be 'realistic', 'oracle' or 'none'", id="unknown protocol"),
    pytest.param(None, S("validation.fraction=0.6"), "validation.fraction: Input should be less than or equal to 0.5", id="val fraction > 0.5"),
    pytest.param(None, S("validation.protocol=none"), FS("validation.protocol=none") + "validation.protocol: 'none' selects nothing, "
                 "so it cannot search", id="none with a search"),
    pytest.param(None, S("data.val_size=100000"), "data.val_size: validation size 100000 must leave images on both sides of 60000", id="val_size > train"),
]


def listing(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.fixture
def bad_data(tmp_path, data_dir):
    """tmp_path/truncated/mnist.npz: the first 100 kB of the real file; tmp_path/empty/mnist.npz: 0 bytes."""
    (tmp_path / "truncated").mkdir()
    with open(Path(data_dir) / "mnist.npz", "rb") as f:
        (tmp_path / "truncated" / "mnist.npz").write_bytes(f.read(100_000))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "mnist.npz").write_bytes(b"")


def test_the_table_covers_forty_distinct_mistakes():
    assert len({p.id for p in BAD}) == len(BAD) >= 40


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("sweep, args, expected", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, data_dir, bad_data, monkeypatch, sweep, args, expected,
                                                          dry_run):
    monkeypatch.chdir(tmp_path)  # relative paths (--set data.data_dir=truncated) and anything written land here
    monkeypatch.setenv("DLSWEEP_DATA_DIR", data_dir)
    path = tmp_path / "study.yaml"
    if sweep is FOLDER:
        path.mkdir()
    else:
        path.write_bytes(sweep_bytes(sweep))
    before = listing(tmp_path)
    store = tmp_path / "store"
    result = runner.invoke(app, ["run", str(path), "--store", str(store), *args, *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not store.exists() and listing(tmp_path) == before  # no store, no Ray state, nothing half-written
    import ray

    assert not ray.is_initialized()
