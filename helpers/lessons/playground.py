"""The prompt playground of notebook 05: ipywidgets around stream_generate, generating in a thread.

The kernel stays responsive because generation runs in a background thread; Stop sets an event that
generate() checks after each token; a second Generate while one runs is refused, not queued.
"""
import html
import threading

import ipywidgets as widgets

from helpers.runtime.formats import CHOICES
from helpers.runtime.models import resolve_model
from helpers.runtime.prompt import check_n_predict, format_prompt
from helpers.runtime.errors import UserError
from helpers.lessons.streaming import stream_generate

DEFAULT_MODEL = "the model trained here (Shakespeare)"


class Playground:
    def __init__(self, source=None, model=None, tokenizer=None):
        self.source, self.model, self.tokenizer = source, model, tokenizer
        self.history, self.message = [], ""
        self._thread, self._stop = None, threading.Event()
        style = {"description_width": "90px"}
        self.prompt = widgets.Textarea(value="What is AI?", description="Prompt", rows=3,
                                       layout=widgets.Layout(width="95%"), style=style)
        self.n_predict = widgets.IntSlider(value=40, min=1, max=512, description="n_predict", style=style)
        self.greedy = widgets.Checkbox(value=True, description="greedy", style=style)
        self.temperature = widgets.FloatSlider(value=1.0, min=0.1, max=2.0, step=0.05, description="temperature", style=style)
        self.top_p = widgets.FloatSlider(value=0.7, min=0.05, max=1.0, step=0.05, description="top_p", style=style)
        self.top_k = widgets.IntSlider(value=0, min=0, max=200, description="top_k (0: off)", style=style)
        self.model_path = widgets.Combobox(placeholder=DEFAULT_MODEL, options=[DEFAULT_MODEL], description="Model",
                                           layout=widgets.Layout(width="60%"), style=style)
        self.low_bit = widgets.Dropdown(options=CHOICES, value="sym_int4", description="Format", style=style,
                                        layout=widgets.Layout(width="25%"))
        self.load_button = widgets.Button(description="Load model", icon="download")
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.output = widgets.Textarea(description="Output", rows=8, layout=widgets.Layout(width="95%"), style=style)
        self.stats = widgets.HTML()
        self.status = widgets.HTML()
        self.history_table = widgets.HTML()
        for name in ("prompt", "output", "stats", "status", "history_table"):  # CSS hooks for browser tests
            getattr(self, name).add_class(f"playground-{name.replace('_', '-')}")
        self.load_button.on_click(lambda _: self.load())
        self.generate_button.on_click(lambda _: self.generate())
        self.stop_button.on_click(lambda _: self.stop())
        self.greedy.observe(lambda _: self._sync_sampling(), "value")
        self._sync_sampling()
        self.widget = widgets.VBox([
            widgets.HBox([self.model_path, self.low_bit, self.load_button]),
            self.prompt,
            widgets.HBox([self.n_predict, self.greedy]),
            widgets.HBox([self.temperature, self.top_p, self.top_k]),
            widgets.HBox([self.generate_button, self.stop_button]),
            self.output, self.stats, self.status, self.history_table,
        ])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _sync_sampling(self):
        for slider in (self.temperature, self.top_p, self.top_k):
            slider.disabled = self.greedy.value

    def _say(self, message, error=False):
        self.message = message  # the status line as plain text
        color = "#b00020" if error else "#555"
        self.status.value = f'<span style="color:{color}">{html.escape(message)}</span>'

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def load(self):
        """Load the model named in the picker (empty or DEFAULT_MODEL: RWKV_MODEL, else the model trained here), in
        the format chosen."""
        if self.running:
            return self._say("Wait for the generation to end, or press Stop, before loading a model.", error=True)
        from helpers.runtime.loading import load_model, load_tokenizer  # imports the low-bit library, after setup()

        name = "" if self.model_path.value in ("", DEFAULT_MODEL) else self.model_path.value
        try:
            self._say("Loading...")
            source = resolve_model(name)
            reports = []  # whether it was converted or loaded from the low-bit cache, and where
            model = load_model(source, self.low_bit.value, report=reports.append)
            self.model, self.tokenizer, self.source = model, load_tokenizer(source), source
        except UserError as error:
            return self._say(f"error: {error}", error=True)
        self._say(" ".join([*reports, f"Ready: {source.producer()}; in {self.low_bit.value}."]))

    def generate(self):
        """Start generating in a background thread; returns at once."""
        if self.running:
            return self._say("Already generating: press Stop first.", error=True)
        try:
            format_prompt(self.prompt.value)
            if self.model is None:
                self.load()
                if self.model is None:  # the load failed and said why
                    return
            check_n_predict(self.n_predict.value, self.model.config.context_length)
        except UserError as error:
            return self._say(f"error: {error}", error=True)
        self._stop.clear()
        self.output.value, self.stats.value = "", ""
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self._say("Generating...")
        self._thread = threading.Thread(target=self._run, args=(self._settings(),), daemon=True)
        self._thread.start()

    def _settings(self):
        settings = {"prompt": self.prompt.value, "n_predict": self.n_predict.value}
        if not self.greedy.value:
            settings.update(do_sample=True, temperature=self.temperature.value, top_p=self.top_p.value,
                            top_k=self.top_k.value)
        return settings

    def _append(self, piece):
        self.output.value += piece

    def _run(self, settings):
        try:
            result = stream_generate(self.model, self.tokenizer, on_text=self._append, stop_event=self._stop, **settings)
        except Exception as error:  # shown in the page: a background thread has nowhere else to report
            self._say(f"error: {error}", error=True)
        else:
            self.stats.value = (f"first token {result.first_token_s * 1000:.0f} ms · {result.tokens_per_s:.1f} tokens/s"
                                f" · {result.tokens} tokens")
            self.history.append({**settings, "tokens": result.tokens, "first_token_ms": result.first_token_s * 1000,
                                 "tokens_per_s": result.tokens_per_s, "stopped": result.stopped, "text": result.text})
            self._render_history()
            self._say("Stopped." if result.stopped else "Done.")
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True

    def _render_history(self):
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{html.escape(run['prompt'][:40])}</td><td>{run['n_predict']}</td>"
            f"<td>{'sample' if run.get('do_sample') else 'greedy'}</td><td>{run['tokens']}</td>"
            f"<td>{run['first_token_ms']:.0f}</td><td>{run['tokens_per_s']:.1f}</td><td>{'yes' if run['stopped'] else ''}</td></tr>"
            for i, run in enumerate(self.history)
        )
        self.history_table.value = (
            "<table><tr><th>#</th><th>prompt</th><th>n_predict</th><th>mode</th><th>tokens</th>"
            f"<th>first token ms</th><th>tokens/s</th><th>stopped</th></tr>{rows}</table>"
        )

    def stop(self):
        """Ask the running generation to end after its current token."""
        self._stop.set()

    def wait(self, timeout=60):
        """Block until the running generation ends (for scripts and tests); True when none is left running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running
