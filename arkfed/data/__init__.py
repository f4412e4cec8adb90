"""Images and labels on their way to tensors: dataset tables, the label schema and findings
vocabulary, image decoding, the prepared-image cache, Ark's views and the loaders.
May import the top-level vocabulary only (errors, io, config, spec)."""
