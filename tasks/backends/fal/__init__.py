"""The fal backend: fal's hosted LongCat-Video-Avatar queue (client, renderer, resubmit policy)."""
