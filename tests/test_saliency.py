"""Saliency: classical backend vs the world's ground-truth masks, the stage, IS-Net's module."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.saliency import ISNet, classical_mask, isnet_mask, load_isnet, run_saliency
from cg4ctr_tasks.shards import Shard
from cg4ctr_tasks.workspace import Workspace


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture()
def world(tiny_world: Path, tmp_path: Path) -> Workspace:
    """A private copy of the session world, so stage outputs do not leak between tests."""
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    return Workspace.open(root)


def test_stage_masks_match_ground_truth(world: Workspace) -> None:
    summary = run_saliency(world, 1)
    assert summary.complete and summary.ok == 8 and not summary.rejected
    table = storage.read_parquet(storage.join(world.round_dir(1), "saliency", "saliency.parquet"))
    assert list(table.columns) == ["item_id", "mask_uri", "product_uri", "status", "error"]
    ious = []
    for row in table.itertuples():
        mask = storage.read_image_array(world.resolve(row.mask_uri), 10**7, 10**7)[..., 0] > 127
        # Ground truth is read here, by the test's assertion only.
        truth = storage.read_image_array(
            str(world.sim / "masks" / f"{row.item_id}.png"), 10**7, 10**7
        )
        ious.append(_iou(mask, truth[..., 0] > 127))
        product = np.asarray(Image.open(world.resolve(row.product_uri)))
        item = storage.read_image_array(
            world.resolve(f"images/items/{row.item_id}.png"), 10**7, 10**7
        )
        assert product.shape == (*mask.shape, 4)
        assert np.array_equal(product[..., :3][mask], item[mask])  # product pixels kept exactly
        assert np.array_equal(product[..., 3] > 0, mask)
    print(f"classical saliency mean IoU on the tiny world: {np.mean(ious):.4f}")
    assert np.mean(ious) >= 0.95


def test_classical_iou_on_fresh_renders() -> None:
    from cg4ctr_tasks.params import load_params
    from cg4ctr_tasks.sim.render import draw_product

    params = load_params().saliency
    rng = np.random.default_rng(3)
    ious = []
    for i in range(60):
        product = draw_product(i % 6, 64, rng)
        ious.append(_iou(classical_mask(product.image, params), product.mask))
    print(f"classical saliency mean IoU on 60 renders: {np.mean(ious):.4f}")
    assert np.mean(ious) >= 0.95


def test_stage_is_sharded_resumable_and_reports_bad_images(world: Workspace) -> None:
    items = storage.read_parquet(world.items_table)
    storage.write_bytes(world.resolve(items.loc[2, "image_uri"]), b"not a png")
    sized = world.params.model_copy(
        update={"saliency": world.params.saliency.model_copy(update={"shard_size": 3})}
    )
    ws = Workspace(root=world.root, params=sized)
    first = run_saliency(ws, 2, Shard(0, 3))
    assert not first.complete and first.parts_written == 1 and first.parts_total == 3
    run_saliency(ws, 2, Shard(1, 3))
    last = run_saliency(ws, 2, Shard(2, 3))
    assert last.complete and last.ok == 7
    assert [r["item_id"] for r in last.rejected] == [items.loc[2, "item_id"]]
    again = run_saliency(ws, 2)
    assert again.parts_skipped == 3 and again.parts_written == 0
    mask_dir = Path(ws.round_dir(2)) / "saliency" / "masks"
    stamp = (mask_dir / "item-0000.png").stat().st_mtime_ns
    forced = run_saliency(ws, 2, force=True)
    assert forced.parts_written == 3 and forced.reused == 0
    assert (mask_dir / "item-0000.png").stat().st_mtime_ns != stamp


def test_cli_saliency(world: Workspace) -> None:
    result = CliRunner().invoke(
        app, ["saliency", "--round", "1", "--workspace", str(world.root), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"ok": 8' in result.output
    bad = CliRunner().invoke(
        app, ["saliency", "--round", "1", "-w", str(world.root), "--shard", "3/2"]
    )
    assert bad.exit_code != 0


def test_isnet_layout_and_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ISNet().eval()
    state = model.state_dict()
    # The official ISNetDIS state dict has 798 tensors holding 44,075,702 numbers (checked
    # against the reference module, outputs identical); spot checks of its names:
    assert len(state) == 798 and sum(v.numel() for v in state.values()) == 44_075_702
    for name in [
        "conv_in.weight",
        "stage1.rebnconvin.conv_s1.weight",
        "stage1.rebnconv7.conv_s1.weight",
        "stage1.rebnconv1d.bn_s1.running_var",
        "stage5.rebnconv4.conv_s1.weight",
        "stage5d.rebnconv3d.conv_s1.weight",
        "stage1d.rebnconv6d.conv_s1.bias",
        "side6.weight",
    ]:
        assert name in state
    assert model.stage5.rebnconv4.conv_s1.dilation == (8, 8)
    assert model.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    assert len(expected) == 6 and all(o.shape == (1, 1, 64, 64) for o in expected)

    pth = tmp_path / "isnet.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, pth)  # DataParallel
    from safetensors.torch import save_file

    st = tmp_path / "isnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    for path in (pth, st):
        loaded = load_isnet(path)
        with torch.inference_mode():
            assert torch.allclose(loaded(x)[0], expected[0])
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    mask = isnet_mask(loaded, image, 64)
    assert mask.shape == (40, 56) and mask.dtype == bool

    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not an isnet-general-use state dict"):
        load_isnet(tmp_path / "bad.pth")


@pytest.mark.slow
def test_isnet_forward_at_native_size() -> None:
    model = ISNet().eval()
    with torch.inference_mode():
        outputs = model(torch.rand(1, 3, 1024, 1024))
    assert outputs[0].shape == (1, 1, 1024, 1024)
    assert float(outputs[0].min()) >= 0.0 and float(outputs[0].max()) <= 1.0


def test_isnet_backend_through_the_stage(world: Workspace, tmp_path: Path) -> None:
    pth = tmp_path / "isnet.pth"
    torch.save(ISNet().state_dict(), pth)
    sal = world.params.saliency.model_copy(
        update={"backend": "isnet", "isnet_checkpoint": str(pth), "isnet_input_size": 64}
    )
    ws = Workspace(root=world.root, params=world.params.model_copy(update={"saliency": sal}))
    summary = run_saliency(ws, 3)
    assert summary.complete and summary.backend == "isnet" and summary.ok == 8
    table = storage.read_parquet(storage.join(ws.round_dir(3), "saliency", "saliency.parquet"))
    assert (table["status"] == "ok").all()
