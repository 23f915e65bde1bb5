"""Two gloo processes (CPU, torch.multiprocessing spawn): the loop's batch order gives each rank whole videos (all
clips of a video on one rank, as the block-diagonal intra term needs), and the DDP-averaged gradient of the ``cavp``
row with gathered slow embeddings equals the one-process gradient over the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

WORLD, PER_RANK = 2, 2


def _setup(rows):
    from mmalign.data.av_clips import AVDataset, AVOptions, load_av_records
    from mmalign.models.cavp import build_sf_cavp

    model = build_sf_cavp(seed=0).eval()  # eval: no dropout, so both runs see the same function
    records, _ = load_av_records([rows], model.media, AVOptions())
    return model, AVDataset(records, model.media, AVOptions(), seed=0)


def _grads(model, batch):
    from mmalign.adapters.av import score_av
    from mmalign.methods.av_losses import CAVP_DEFAULTS, cavp_row

    out = cavp_row(score_av(model, batch), None, batch, dict(CAVP_DEFAULTS))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, rows: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from mmalign.data.av_clips import AVCollator
        from mmalign.train.data_order import BatchOrder
        from mmalign.train.stage import collate_with_index

        model, ds = _setup(rows)
        order = BatchOrder(len(ds), PER_RANK, seed=0, world_size=WORLD, rank=rank)
        indices = order.next_indices()
        batch = collate_with_index(AVCollator(), ds, indices)
        loss, grads = _grads(model, batch)
        for g in grads.values():  # what DDP does: average over ranks
            torch.distributed.all_reduce(g)
            g /= WORLD
        torch.save({"indices": indices, "starts": batch.extras["starts"], "clips": batch.slow.shape[:2],
                    "loss": loss, "grads": grads, "perm": order._perm}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_videos_whole_and_match_one_process(av_rows, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(av_rows), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, ds = _setup(av_rows)
    perm = ranks[0]["perm"]
    assert [r["indices"] for r in ranks] == [perm[0:2], perm[2:4]]  # slot order, disjoint
    for r in ranks:  # every video arrives with all its clips, cut exactly as on one process
        assert tuple(r["clips"]) == (PER_RANK, 3)
        assert torch.equal(r["starts"], torch.stack([torch.tensor(ds.starts(i)) for i in r["indices"]]).float())
    from mmalign.data.av_clips import AVCollator
    from mmalign.train.stage import collate_with_index

    loss, grads = _grads(model, collate_with_index(AVCollator(), ds, perm[:WORLD * PER_RANK]))
    assert sum(float(r["loss"]) for r in ranks) / WORLD == pytest.approx(float(loss), rel=1e-4)
    assert grads.keys() == ranks[0]["grads"].keys()
    for name, g in grads.items():
        assert torch.allclose(ranks[0]["grads"][name], g, rtol=1e-3, atol=1e-6), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
