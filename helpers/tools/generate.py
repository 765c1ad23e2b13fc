"""Generate text with RWKV-4 in bigdl-llm low-bit on the CPU, in the layout of the upstream example.

    python -m helpers.tools.generate [--repo-id-or-model-path PATH_OR_ID] [--prompt TEXT] [--n-predict N] [--low-bit FMT]

Without a model it uses the small model trained here on Shakespeare (helpers.tools.train), not the 7B. The first run
converts the model into a low-bit cache, later runs load that (RWKV_LOW_BIT_CACHE=0: convert every time);
a line on stderr says which happened.
"""
import argparse
import sys

from helpers.measure.timing import generate
from helpers.runtime.prompt import DEFAULT_N_PREDICT, DRAGON_PROMPT, check_n_predict, format_prompt
from helpers.runtime import settings, startup
from helpers.runtime.errors import UserError
from helpers.runtime.formats import CHOICES, LOW_BIT_HELP
from helpers.runtime.models import resolve_model


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Predict tokens with generate() for an RWKV-4 model in low-bit.")
    parser.add_argument("--repo-id-or-model-path", "--model", dest="model", default=None,
                        help=settings.flag_help("model"))
    parser.add_argument("--prompt", default=DRAGON_PROMPT, help="prompt to infer")
    parser.add_argument("--n-predict", type=int, default=DEFAULT_N_PREDICT, help="max tokens to predict")
    parser.add_argument("--low-bit", default="sym_int4", choices=CHOICES, help=LOW_BIT_HELP)
    settings.add_flags(parser, "library", "native_build", "fused_decode", "fused_kernel", "low_bit_cache")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        format_prompt(args.prompt)  # refuse bad input before anything slow
        chosen = settings.from_flags(args)
        startup.start(chosen)
        from helpers.runtime.loading import load_model, load_tokenizer  # after start(): it imports the low-bit library

        source = resolve_model(chosen.model)
        check_n_predict(args.n_predict, source.config["context_length"])
        model = load_model(source, args.low_bit, report=lambda line: print(line, file=sys.stderr))
        print(f"Model: {source.producer()}", file=sys.stderr)
        tokenizer = load_tokenizer(source)
        result = generate(model, tokenizer, args.prompt, args.n_predict)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
