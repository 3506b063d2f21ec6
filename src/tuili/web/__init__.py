"""The browser pages tuili serves itself: the chat page (`/`) and the dashboard (`/dashboard`).

Plain HTML, CSS and JavaScript with no third-party code and no build step; everything here
ships in the package and is served by `tuili.serve.web` from a fixed list of names. Model
and user text only ever reach the page as text nodes (`textContent`), never as markup, and
the pages run under a Content-Security-Policy that forbids inline scripts.
"""
