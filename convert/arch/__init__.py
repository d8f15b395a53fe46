"""One small file per architecture: its config keys and tensor names mapped onto the layout."""
