"""The adapted model and what it stands on: injection, per-row adapter choice (`rows`), the key/value
prefix feeder (`kv_prefix`), inference weights, the checks an adapter passes before it attaches, saved
module copies and what a base layer is (`layer_types`).

`rows`, `kv_prefix` and `layer_types` sit below the methods (every adapter layer reads them);
`inject`, `checks`, `weights`, `saved_modules` and `adapted` sit above them and dispatch through
`MethodSpec`, so nothing here names a method.
"""
