"""Compile every build of the fused decoding step this CPU runs into the kernel cache, once (`make install`
runs it), and say which build decoding will use, or why it will go through torch.

    python -m helpers.tools.build_kernels [--werror]

--werror first compiles each build with warnings as errors (CI). Without a compiler or AVX2 it says so and
exits 0: the notebooks and tools then run the torch path.
"""
import argparse
import sys

from helpers.runtime import fused_decode
from helpers.runtime.errors import one_line_errors


@one_line_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--werror", action="store_true", help="compile each build with warnings as errors first")
    args = parser.parse_args(argv)
    builds = fused_decode.runnable_kernels()
    try:
        for kernel in builds:
            if args.werror:
                fused_decode.check_warnings(kernel)
            fused_decode.load_library(kernel)  # compiles it into the kernel cache, and checks its ABI
            print(f"fused step, {kernel} build: {fused_decode.build_library(kernel)}")
    except RuntimeError as error:
        if args.werror or "no C compiler" not in str(error):
            sys.exit(f"Error: {error}")
    print(f"Decoding will use {fused_decode.decoding_path()}.")


if __name__ == "__main__":
    main()
