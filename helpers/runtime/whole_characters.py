"""Text decoded token by token, whole characters only: RWKV World's tokens are bytes, a character's UTF-8
bytes can be split over up to four tokens, and a piece that ends inside a character waits for the rest.
The widgets' streaming and the serving worker both stream through it."""

MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so it is split over at most 4 tokens


class WholeCharacters:
    """Feed token ids one at a time; each add returns the text they complete."""

    def __init__(self, decode):
        self.decode, self.pending = decode, []  # decode: token ids -> text

    def add(self, token):
        """The text this token completes: "" while a split character waits for its next bytes (after 4 tokens
        the replacement character is let through: those bytes are not UTF-8)."""
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < MAX_CHAR_TOKENS:
            return ""
        self.pending = []
        return piece
