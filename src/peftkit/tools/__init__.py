"""Tools over saved adapters and base models: open one with its adapters (`opening`), merge, combine
and describe (`info`). Each is a library function that a command calls; none parses arguments."""
