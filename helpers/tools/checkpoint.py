"""Build the offline RWKV-4 World checkpoint: random weights, real architecture, real tokenizer
(helpers.measure.checkpoints).

Two layouts, the same weights: ``safetensors`` (the default) and ``hub``, exactly as the Hugging Face repos
``RWKV/rwkv-4-world-*`` ship it (one fp16 ``pytorch_model.bin``, in shards with an index when --shard-gb is
given). Its text is meaningless: the weights are random.

    python -m helpers.tools.checkpoint --shape tiny [--layout hub] [--out data/models/rwkv-4-world-tiny]

``--trained`` builds instead the model trained here on Shakespeare (helpers.tools.train) from its committed
compact weights (data/trained/), in the hub's layout, in a second or two.
"""
import argparse
from pathlib import Path

from helpers.measure.checkpoints import LAYOUTS, TRAINED_WEIGHTS, build_checkpoint, build_trained_checkpoint
from helpers.runtime.shapes import SHAPES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="safetensors",
                        help="safetensors (default), or hub: pytorch_model.bin as the Hugging Face repos ship it")
    parser.add_argument("--shard-gb", type=float, help="weights in files of at most this many GB "
                        "(default: 2 GiB shards for safetensors, one file for hub)")
    parser.add_argument("--out", type=Path, help="target folder (default: data/models/rwkv-4-world-SHAPE[-hub])")
    parser.add_argument("--trained", action="store_true",
                        help=f"instead: build the model trained here from {TRAINED_WEIGHTS.name}, in the hub's layout")
    args = parser.parse_args(argv)
    if args.trained:
        print(f"Wrote the trained model's checkpoint to {build_trained_checkpoint(out=args.out)}")
        return
    shard_bytes = None if args.shard_gb is None else int(args.shard_gb * 1e9)
    out = build_checkpoint(args.shape, args.out, args.layout, shard_bytes)
    print(f"Wrote the {args.shape} checkpoint in the {args.layout} layout to {out}")


if __name__ == "__main__":
    main()
