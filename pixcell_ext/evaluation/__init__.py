"""Measuring a synthetic set: feature extractors and store, distribution metrics with intervals, probes, downstream
curves, memorisation, LPIPS, the report and its plots. The top product layer: it reads generation's manifest."""
