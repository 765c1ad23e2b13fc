"""What a low-bit format costs in quality: perplexity on held-out text, and how far each format's next-token
distribution moves from FP32's (helpers.measure.perplexity measures it).

    python -m helpers.tools.perplexity [--model M] [--formats fp32,sym_int4,...] [--text FILE] [--max-tokens N] [--json OUT]
    python -m helpers.tools.perplexity --per-matrix [--formats sym_int4] ...

The default model is the one trained here (helpers.tools.train), the default text its held-out split (The
Tempest). It prints a Markdown table; --json writes the rows (data/quality/ holds the committed runs).
--per-matrix quantizes each kind of matrix alone, the rest in FP32, in one low-bit format (default sym_int4;
helpers.measure.sensitivity), to show which matrices the format's cost comes from.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from helpers.measure.perplexity import FORMATS, PATHS, check_formats, measure, read_text_ids
from helpers.measure.reports import kinds_table, quality_table
from helpers.runtime import settings, startup
from helpers.runtime.errors import UserError
from helpers.runtime.models import resolve_model
from helpers.runtime.paths import HELD_OUT_TEXT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_flags(parser, "model", "library", "native_build", "fused_decode", "fused_kernel", "low_bit_cache")
    parser.add_argument("--formats", help=f"comma-separated, from {', '.join(FORMATS)} (default: all; with "
                        "--per-matrix one low-bit format, default sym_int4)")
    parser.add_argument("--per-matrix", action="store_true", help="quantize each kind of matrix alone, the rest in FP32")
    parser.add_argument("--paths", default=",".join(PATHS), help="fused, torch or both (low-bit formats only)")
    parser.add_argument("--text", type=Path, default=HELD_OUT_TEXT, help="UTF-8 text (default: the held-out split)")
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    try:
        chosen = settings.from_flags(args)
        startup.start(chosen)
        from helpers.runtime.loading import load_tokenizer

        formats, paths = (args.formats or ("sym_int4" if args.per_matrix else ",".join(FORMATS))).split(","), args.paths.split(",")
        check_formats(formats)
        if args.per_matrix and (len(formats) != 1 or formats == ["fp32"]):
            raise UserError("--per-matrix measures one low-bit format at a time; pass --formats sym_int4, say.")
        if not set(paths) <= set(PATHS) or not paths:
            raise UserError(f"Unknown path in {args.paths!r}; choose fused, torch or fused,torch.")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise UserError("--max-tokens must be at least 1.")
        source = resolve_model(chosen.model)
        tokenizer = load_tokenizer(source)
        ids = read_text_ids(tokenizer, args.text, args.max_tokens)
        report = lambda line: print(line, file=sys.stderr)  # noqa: E731
        if args.per_matrix:
            from helpers.measure.sensitivity import measure_kinds

            rows = measure_kinds(source, ids, formats[0], report)
        else:
            rows = measure(source, ids, formats, paths, report)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(kinds_table(rows) if args.per_matrix else quality_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
