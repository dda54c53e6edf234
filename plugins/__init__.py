"""The built-in task plugins (import name ``compressor_plugins``): ner, relation, classification, qa."""
