"""A backend package that cannot even be imported (as when a native library is missing)."""
raise ImportError("libfancy.so.3: cannot open shared object file (deliberately broken test backend)")
