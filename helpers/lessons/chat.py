"""A chat box for notebook 06: ipywidgets around a reply function that the notebook defines.

The notebook's ``reply(text, conversation, sampling=...)`` reads a user turn into the conversation's RNN
state and yields the answer's token ids as they come; the box streams them into its transcript, offers
Stop (after the current token) and Reset (a new conversation), and sliders for the sampling settings,
the `rwkv` package's defaults to begin with (helpers.runtime.sampling.RWKV_DEFAULTS).
"""
import dataclasses
import html
import threading
import time

import ipywidgets as widgets

from helpers.runtime.sampling import RWKV_DEFAULTS

# (setting, slider label, largest value, step): the Sampling fields the box lets a person change.
SLIDERS = [("temperature", "temperature", 2.0, 0.05), ("top_p", "top_p", 1.0, 0.05),
           ("presence_penalty", "presence", 2.0, 0.05), ("frequency_penalty", "frequency", 2.0, 0.05)]


def new_conversation():
    """What the model remembers of a chat: its RNN state (None before the first turn)."""
    return {"state": None}


class ChatBox:
    def __init__(self, reply, tokenizer, sampling=RWKV_DEFAULTS):
        self.reply, self.tokenizer, self.defaults = reply, tokenizer, sampling
        self.conversation, self.turns = new_conversation(), []  # turns: [user text, answer text]
        self._thread, self._stop = None, threading.Event()
        self.message = widgets.Text(placeholder="Say something, then press Send", layout=widgets.Layout(width="70%"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.reset_button = widgets.Button(description="Reset", icon="refresh")
        self.transcript = widgets.HTML()
        self.status = widgets.HTML()
        self.sliders = {name: widgets.FloatSlider(value=getattr(sampling, name), min=0.0, max=largest, step=step,
                                                  description=label, continuous_update=False,
                                                  layout=widgets.Layout(width="24%"))
                        for name, label, largest, step in SLIDERS}
        for name in ("message", "transcript", "status"):  # CSS hooks for browser tests
            getattr(self, name).add_class(f"chat-{name}")
        self.send_button.on_click(lambda _: self.send())
        self.message.on_submit(lambda _: self.send())
        self.stop_button.on_click(lambda _: self._stop.set())
        self.reset_button.on_click(lambda _: self.reset())
        self.widget = widgets.VBox([
            self.transcript,
            widgets.HBox([self.message, self.send_button, self.stop_button, self.reset_button]),
            widgets.HBox(list(self.sliders.values())),
            self.status,
        ])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def _say(self, text):
        self.status.value = f'<span style="color:#555">{html.escape(text)}</span>'

    @property
    def sampling(self):
        """The box's defaults with the sliders' values (temperature 0: greedy)."""
        return dataclasses.replace(self.defaults, **{name: slider.value for name, slider in self.sliders.items()})

    def _show(self):
        lines = [f"<b>User:</b> {html.escape(user)}<br><b>AI:</b> {html.escape(answer)}" for user, answer in self.turns]
        self.transcript.value = "<br><br>".join(lines)

    def send(self):
        """Answer the message in a background thread; returns at once."""
        text = self.message.value.strip()
        if self.running:
            return self._say("Still answering: press Stop first.")
        if not text:
            return self._say("Type a message first.")
        self.message.value = ""
        self.turns.append([text, ""])
        self._stop.clear()
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._say("Answering...")
        self._thread = threading.Thread(target=self._answer, args=(text, self.sampling), daemon=True)
        self._thread.start()

    def _answer(self, text, sampling):
        start, first, tokens = time.perf_counter(), None, 0
        try:
            for ids in self.reply(text, self.conversation, sampling=sampling):
                first = first or time.perf_counter() - start
                tokens = len(ids)
                self.turns[-1][1] = self.tokenizer.decode(ids, skip_special_tokens=True)
                self._show()
                if self._stop.is_set():
                    break
            stopped = " (stopped)" if self._stop.is_set() else ""
            self._say(f"{tokens} tokens{stopped}, first after {(first or 0) * 1000:.0f} ms")
        finally:
            self.send_button.disabled, self.stop_button.disabled = False, True

    def reset(self):
        """A new conversation: the state and the transcript start over."""
        if self.running:
            return self._say("Still answering: press Stop first.")
        self.conversation, self.turns = new_conversation(), []
        self._show()
        self._say("New conversation.")

    def wait(self, timeout=300):
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running
