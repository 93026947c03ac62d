"""faiss's ResidualQuantizer on the data `rvq-kv bench codec` writes, for a same-run comparison.

Reads raw little-endian f32 train/test matrices, trains like rvq-kv's paper config (k-means per
stage on a sample of the same size, the same number of iterations, greedy assignment during
training), then encodes the test set with each beam width. Prints one JSON object on stdout.
"""
import argparse
import json
import time

import faiss
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--beams", required=True, help="comma-separated beam widths")
    p.add_argument("--niter", type=int, required=True)
    p.add_argument("--sample", type=int, required=True, help="k-means sample size")
    a = p.parse_args()
    nbits = a.size.bit_length() - 1
    if 1 << nbits != a.size:
        raise SystemExit(f"faiss needs a power-of-two codebook size, got {a.size}")
    train = np.fromfile(a.train, dtype="<f4").reshape(-1, a.dim)
    test = np.fromfile(a.test, dtype="<f4").reshape(-1, a.dim)

    rq = faiss.ResidualQuantizer(a.dim, a.stages, nbits)
    rq.train_type = faiss.ResidualQuantizer.Train_default  # plain k-means per stage
    rq.max_beam_size = 1  # greedy residuals during training, as rvq-kv
    rq.cp.niter = a.niter
    rq.cp.max_points_per_centroid = max(1, a.sample // a.size)
    t = time.perf_counter()
    rq.train(train)
    train_s = time.perf_counter() - t

    energy = float(np.sum(test.astype(np.float64) ** 2))
    results = []
    for beam in [int(b) for b in a.beams.split(",")]:
        rq.max_beam_size = beam
        t = time.perf_counter()
        codes = rq.compute_codes(test)
        secs = time.perf_counter() - t
        err = float(np.sum((rq.decode(codes).astype(np.float64) - test) ** 2))
        results.append(
            {"beam": beam, "encode_vectors_per_s": len(test) / secs, "relative_mse": err / energy}
        )
    print(json.dumps({"faiss_version": faiss.__version__, "train_s": train_s, "results": results}))


if __name__ == "__main__":
    main()
