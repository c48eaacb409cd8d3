"""`mclfir serve`: the HTTP service and search page over a run's model and an `mclfir index` folder.

app.py builds the FastAPI app (routes and error replies), inputs.py checks what a request brings (body size,
image magic bytes, keys, attributes, k, filters), batcher.py embeds concurrent uploads in one batch,
static/index.html is the page (retrieval/images.py finds a catalogue item's image by key).
"""
