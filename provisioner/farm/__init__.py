"""``dynvm farm``: the embedded default — everything on one machine."""
