"""`cmath-demo EXPORT_DIR`: a page on 127.0.0.1 to try an exported text model in a browser (optional extra `demo`).

It runs the torch-free runtime (cmath_runtime) behind a small Starlette app; the page is one HTML file with a
little vanilla JavaScript and draws its own chart (nothing is fetched from the internet).
"""
