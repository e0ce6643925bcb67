"""Fine-tuning the last stages on the cached frozen prefix (issue 20): what trains, what stays, what is saved.

Real photos (the tiny store), real EfficientNet-Lite0 weights, the real feature cache and training code."""
from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from hsflow.training import stages
from hsflow.core.config import CONF_DIR
from hsflow.core.images import open_rgb
from hsflow.models.classifier import MarginHead, build_head, head_spec, warmup_cosine
from hsflow.models.bundle import HSModel
from hsflow.models.network import assemble


def _fit(tiny_store, cache, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.raw_store={tiny_store}", f"paths.cache_dir={cache}",
                                          "model.unfreeze=1", "trainer.max_epochs=2", "optimizer=adamw",
                                          "optimizer.lr=1e-2", f"paths.output_dir={cache}/out", *overrides])
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network, stages.data, stages.module):  # up to the fit
        stage(ctx)
    spec, net, pre, dm, module = ctx.spec, ctx.net, ctx.pre, ctx.dm, ctx.module
    before = (copy.deepcopy(net.prefix.state_dict()), copy.deepcopy(module.suffix.state_dict()))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return cfg, spec, net, pre, dm, module, before


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_finetuned_stage_changes_and_the_frozen_prefix_does_not(tiny_store, session_cache, bn):
    _, _, net, _, _, module, (prefix0, suffix0) = _fit(tiny_store, session_cache, f"finetune.bn={bn}",
                                                        "finetune.warmup_epochs=1", "finetune.train_crop=4")
    assert all(torch.equal(v, net.prefix.state_dict()[k]) for k, v in prefix0.items())
    after = module.suffix.state_dict()
    weights = [k for k in suffix0 if k.endswith("weight")]
    assert weights and all(not torch.equal(suffix0[k], after[k]) for k in weights)  # every conv / BN scale moved
    stats = [k for k in suffix0 if k.endswith("running_mean")]
    assert stats
    unchanged = all(torch.equal(suffix0[k], after[k]) for k in stats)
    assert unchanged == (bn == "frozen")  # frozen: ImageNet statistics kept; train: updated from batches


def test_saved_finetuned_model_answers_a_photo_exactly_as_the_trained_module(tiny_store, session_cache, tmp_path):
    cfg, spec, net, pre, dm, module, _ = _fit(tiny_store, session_cache, "finetune.bn=frozen",
                                              "model.head.kind=cosface", "model.head.hidden=16")
    full = assemble(net.prefix, module.suffix, module.head).cpu().eval()
    meta = {"backbone": cfg.model.name, "unfreeze": cfg.model.unfreeze, "head": head_spec(cfg.model.head),
            "classes": spec.classes, "preprocess": pre}
    HSModel(full, meta).save(tmp_path / "model")
    loaded = HSModel.load(tmp_path / "model")
    photo = torch.stack([loaded.preprocess()(open_rgb(spec.split("test")[0].path))])
    module.eval()
    with torch.no_grad():
        expected = module(net.prefix(photo))
    assert isinstance(loaded.net[2][-1], MarginHead)
    assert torch.equal(loaded.logits(photo), expected)


def test_margin_head_logits_are_scaled_cosines_and_the_margin_makes_training_harder():
    torch.manual_seed(0)
    head = build_head(8, 3, 0, 0.0, "cosface", scale=10.0, margin=0.3)
    emb, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    proxies = head[-1].loss.W  # (embedding, classes)
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(proxies, dim=0)
    assert torch.allclose(head(emb), 10.0 * cos, atol=1e-5)
    plain = torch.nn.functional.cross_entropy(head(emb), y)
    assert float(head[-1].loss(emb, y)) > float(plain)


def test_warmup_rises_then_cosine_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.01


def test_saved_joined_model_answers_a_photo_exactly_as_the_trained_module(tiny_store, session_cache, tmp_path):
    """make train's default joins Lite0 to Lite1 (`model.concat`): the saved folder rebuilds both networks."""
    cfg, spec, net, pre, dm, module, _ = _fit(tiny_store, session_cache, "model=efficientnet_lite1",
                                              "model.unfreeze=0", "model.concat=[efficientnet_lite0]")
    full = assemble(net.prefix, module.suffix, module.head).cpu().eval()
    meta = {"backbone": cfg.model.name, "unfreeze": 0, "concat": list(cfg.model.concat),
            "head": head_spec(cfg.model.head), "classes": spec.classes, "preprocess": pre}
    HSModel(full, meta).save(tmp_path / "model")
    loaded = HSModel.load(tmp_path / "model")
    photo = torch.stack([loaded.preprocess()(open_rgb(spec.split("test")[0].path))])
    module.eval()
    net.prefix.to(memory_format=torch.contiguous_format)  # extraction ran it channels-last: other kernels, 5e-7 apart
    with torch.no_grad():
        expected = module(net.prefix(photo))
    assert net.dim == 2 * 1280 and dm.splits["train"].tensors[0].shape[1] == net.dim
    assert torch.equal(loaded.logits(photo), expected)
