"""The runtime every converted stage becomes. Imports only torch, so a converted model
needs nothing else to run or unpickle."""
