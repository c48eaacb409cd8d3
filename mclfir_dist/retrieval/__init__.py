"""Using a trained model: embed a catalogue (embed.py), index it with FAISS (index.py), search it by
attribute and draw the results (search.py). Commands: `mclfir embed | index | search`."""
