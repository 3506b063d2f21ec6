"""Data files shipped with tuili (a public-domain text corpus)."""
