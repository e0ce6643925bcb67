"""Every option of every config group composes and instantiates; wrong values fail with one clear line."""
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import PY, ROOT
from hsflow.core.config import CONF_DIR
from hsflow.models.backbones import backbone_from_config, build_backbone, check_join, split_backbone

GROUPS = ["dataset", "model", "optimizer", "trainer", "logger", "paths", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_defaults_reproduce_the_study():
    cfg = compose_cfg()
    assert cfg.batch_size == 32 and cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.lr == 1e-4
    assert cfg.model.name == "efficientnet_lite0" and cfg.model.unfreeze == 0 and cfg.model.head.dropout == 0.5
    assert cfg.dataset.name == "demo" and dict(cfg.dataset.split) == {
        "by": "date", "cuts": ["2018-01-01", "2019-01-01"], "train": 0.7, "val": 0.15, "test": 0.15, "seed": 42}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for opt in options(group):
        cfg = compose_cfg(f"{group}={opt}")
        assert cfg is not None


@pytest.mark.parametrize("name", options("model"))
def test_every_model_instantiates(name):
    cfg = compose_cfg(f"model={name}", "model.pretrained=false").model
    bb = backbone_from_config(cfg)  # the class model.net._target_ names, as training builds it
    assert bb.name == cfg.name and type(bb).__name__ == cfg.net._target_.rsplit(".", 1)[1]
    net = split_backbone(bb, 0, "x")
    x = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        assert net.prefix.eval()(x).shape == (1, bb.dim)
    partial = split_backbone(bb, 1, "x")
    assert any(p.requires_grad for p in partial.suffix.parameters())
    assert not any(p.requires_grad for p in partial.prefix.parameters())


def test_concat_joins_frozen_backbones_on_one_input():
    """`model.concat=[efficientnet_lite0]`: both backbones see the same photo; their pooled vectors side by side,
    a cache of its own; fine-tuning cannot be asked for with a join (one clear error)."""
    lite1, lite0 = build_backbone("efficientnet_lite1", False), build_backbone("efficientnet_lite0", False)
    alone, joined = split_backbone(lite1, 0, "x"), split_backbone(lite1, 0, "x", [lite0])
    x = torch.rand(2, 3, 240, 240)
    with torch.no_grad():
        out = joined.prefix(x)
        assert out.shape == (2, lite1.dim + lite0.dim) == (2, joined.dim)
        assert torch.allclose(out[:, :lite1.dim], alone.prefix(x))
    assert joined.cache_id != alone.cache_id == split_backbone(lite1, 0, "x").cache_id
    with pytest.raises(ValueError, match="model.unfreeze=0"):
        split_backbone(lite1, 1, "x", [lite0])
    check_join("efficientnet_lite1", ["efficientnet_lite0", "efficientnet_lite2"])
    with pytest.raises(ValueError, match="only EfficientNet-Lite backbones can be joined"):
        check_join("efficientnet_lite1", ["resnet50"])  # ImageNet mean/std: it would read the wrong input


@pytest.mark.parametrize("name", options("optimizer"))
def test_every_optimizer_instantiates(name):
    factory = instantiate(compose_cfg(f"optimizer={name}").optimizer)
    assert isinstance(factory([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)


@pytest.mark.parametrize("name", options("trainer"))
def test_every_trainer_instantiates(name):
    cfg = compose_cfg(f"trainer={name}", "paths.output_dir=/tmp/hsflow-test")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("GPU trainer config: composes here, instantiates only with CUDA")
    assert instantiate(cfg.trainer, logger=False).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("overrides, expected", [
    (["model=resnet5"], "Could not find 'model/resnet5'"),
    (["model.unfreeze=99"], "model.unfreeze=99"),
    (["model=efficientnet_lite1", "model.concat=[resnet50]"], "only EfficientNet-Lite backbones can be joined"),
    (["features=magic"], "features='magic'"),
    (["num_workers=-2"], "num_workers=-2"),
    (["unknown.normalize=cosine"], "unknown.normalize='cosine'"),
    (["dataset.split.by=ruling", "dataset.split.train=0.9"], "sum to 1"),
    (["dataset.split.by=month"], "split.by"),
    (["dataset.split.cuts=[2018-01-01,2030-01-01]"], "leave the test period empty"),
])
@pytest.mark.slow
def test_wrong_override_is_a_clear_error(overrides, expected, tmp_path):
    proc = subprocess.run([PY, "-m", "hsflow.train", *overrides, f"hydra.run.dir={tmp_path}",
                           f"logger.tracking_uri=sqlite:///{tmp_path}/m.db"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_make_train_default_is_the_recommended_experiment():
    """`make train` trains experiment=recommended; an experiment may set top-level values too."""
    assert "-m hsflow.train experiment=recommended" in (ROOT / "Makefile").read_text()
    cfg = compose_cfg("experiment=recommended")
    assert cfg.model.name == "efficientnet_lite1" and cfg.model.unfreeze == 0 and cfg.model.head.hidden == 512
    assert list(cfg.model.concat) == ["efficientnet_lite0"]  # issue 20: joined features won on 2018
    assert cfg.scheduler == "cosine" and cfg.label_smoothing == 0.1 and cfg.optimizer.lr == 1e-3
    assert cfg.refit.enabled and cfg.dataset.split.by == "date"  # refit on train + 2018 after choosing on 2018
    study = compose_cfg("experiment=study_frozen")
    assert study.optimizer._target_ == "torch.optim.RMSprop" and study.model.head.dropout == 0.5


def test_the_slurm_launcher_runs_one_task_per_device():
    """`-m hydra/launcher=slurm trainer=ddp trainer.devices=4`: one job, one task per GPU (Lightning's SLURM
    environment makes each task one DDP process)."""
    cfg = compose_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
    assert compose_cfg("hydra/launcher=slurm").hydra.launcher.tasks_per_node == 1  # trainer=default: one device


def test_the_slurm_launcher_asks_for_the_trainers_nodes():
    """`trainer.num_nodes=2` is one value for both: Lightning's node count and the nodes the Slurm job asks for."""
    cfg = compose_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    assert cfg.hydra.launcher.nodes == 2 and cfg.trainer.num_nodes == 2
    assert compose_cfg("hydra/launcher=slurm").hydra.launcher.nodes == 1
    for name in ("default", "cpu", "gpu", "ddp"):
        assert compose_cfg(f"trainer={name}").trainer.num_nodes == 1
