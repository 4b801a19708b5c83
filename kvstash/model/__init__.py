"""The model: registry and loading, rotary embedding, attention math, the runner's layer loop, query replay."""
