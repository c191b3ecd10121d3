"""GPU correctness: bf16 autocast, SDPA flash attention, torch.compile of the loss. Run with
`pytest -m gpu` on a machine with CUDA; skipped elsewhere."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.data.clm import CLMBatcher
from lmforge.models import build_model
from lmforge.train.clm import CLMObjective
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return build_model("gpt", dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, d_model=64, **kw))


def batcher():
    toks = (np.arange(20000) * 7 % 97).astype(np.uint16)  # a deterministic, learnable sequence
    return CLMBatcher(SimpleNamespace(tokens=toks), SimpleNamespace(tokens=toks[:2000]), seq_len=64, batch_size=8, seed=0)


def test_gpu_logits_match_cpu_fp32():
    model = tiny_gpt()
    ids = torch.randint(0, 97, (4, 64))
    ref = model(ids)
    got = model.cuda()(ids.cuda()).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_close_to_fp32():
    model = tiny_gpt().cuda()
    ids = torch.randint(0, 97, (4, 64), device="cuda")
    ref = torch.log_softmax(model(ids).float(), -1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = torch.log_softmax(model(ids).float(), -1)
    assert (got - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_on_gpu_reduces_loss(tmp_path, precision):
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, log_every=10, device="cuda",
                      precision=precision, tensorboard=False, progress=False)
    tr = Trainer(tiny_gpt(), CLMObjective(), batcher(), cfg, tmp_path / precision, run_config={"arch": "gpt", "model": {}})
    before = tr.evaluate()["loss"]
    after = tr.fit().val["loss"]
    assert after < before - 1.0


def test_compiled_loss_equals_eager(tmp_path):
    b = batcher().train_batch(0, 0)
    b = {k: v.cuda() for k, v in b.items()}
    model = tiny_gpt().cuda()
    eager, _ = CLMObjective().loss(model, b)
    compiled, _ = torch.compile(CLMObjective().loss)(model, b)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
