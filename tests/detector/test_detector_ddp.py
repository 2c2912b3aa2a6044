"""Multi-process training on CPU (torchrun, gloo): synchronised BatchNorm and a 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_naive_sync_batchnorm_equals_batchnorm_over_all_processes(tmp_path):
    """Two processes each hold half of a batch (unequal halves); the synchronised BN gives the
    outputs, input gradients and running statistics of one BN over the whole batch."""
    script = tmp_path / "sync_bn.py"
    script.write_text(textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from twopass.detector.backbone import NaiveSyncBatchNorm
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 3, 4, 6, generator=g) * 2 + 1
        parts = [x[:2], x[2:]]
        ref = torch.nn.BatchNorm2d(3)
        ref.weight.data.uniform_(0.5, 1.5, generator=g); ref.bias.data.uniform_(-1, 1, generator=g)
        sync = NaiveSyncBatchNorm(3)
        sync.load_state_dict(ref.state_dict())
        xr = x.clone().requires_grad_(True)
        w = torch.randn(x.shape, generator=g)
        ref_out = ref(xr)
        (ref_out * w).sum().backward()
        mine = parts[rank].clone().requires_grad_(True)
        out = sync(mine)
        (out * w[:2] if rank == 0 else out * w[2:]).sum().backward()
        lo, hi = (0, 2) if rank == 0 else (2, 5)
        ok = (torch.allclose(out, ref_out[lo:hi].detach(), atol=1e-5)
              and torch.allclose(mine.grad, xr.grad[lo:hi], atol=1e-5)
              and torch.allclose(sync.running_mean, ref.running_mean, atol=1e-6)
              and torch.allclose(sync.running_var, ref.running_var, atol=1e-5))
        open(r"{tmp_path}/ok_%d" % rank, "w").write(str(ok))
        dist.destroy_process_group()
        """
    ))
    p = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "ok_0").read_text() == "True" and (tmp_path / "ok_1").read_text() == "True"


TINY_SYNC = """\
name: tiny_sync
backbone: {name: resnet18, fpn_channels: 16, trainable_stages: 5}
norm: {backbone: sync_bn}
rpn: {pre_nms_top_n_train: 64, post_nms_top_n_train: 32, batch_size_per_image: 32}
box_head: {type: location_sensitive, fc_dim: 32, kernel_size: 3, mid_channels: 8, alpha: 2, batch_size_per_image: 16}
mask_head: {enabled: true, conv_dim: 8, num_convs: 1}
input: {train_sizes: [48, 64], test_size: 64, max_size: 96}
train: {warmup_iters: 2, clip_grad_norm: 5.0}
"""


def test_two_process_ddp_training_on_cpu(synth_small, tmp_path):
    cfg = tmp_path / "tiny_sync.yaml"
    cfg.write_text(TINY_SYNC)
    ann, images, run = synth_small / "annotations.json", synth_small / "images", tmp_path / "run"
    args = ["-m", "twopass.pipeline.cli", "train-detector", "--config", str(cfg), "--train-ann", str(ann), "--train-images", str(images),
            "--out", str(run), "--iters", "3", "--batch", "2", "--no-progress", "--val-ann", str(ann), "--val-images", str(images)]
    p = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "iter_0000003.json").read_text())
    assert meta["extra"]["world"] == 2
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]  # one process writes the log
    assert "bbox" in records[-1]["val"]
    # the checkpoint of a 2-process run loads in one process
    from twopass.detector.api import DETECTOR

    model, _ = DETECTOR.load(run)
    assert not any(type(m).__name__ == "NaiveSyncBatchNorm" for m in model.modules())
