"""What train_gpt.py and train_cifar.py keep out of their story, none of it about
optimizers: runs.py (run folders, one writer per run, resuming, downloads, command-line
checks, precision, torchrun) and text_data.py (text files to a token cache). A package, so
that the scripts can import it; results/ holds the results page and the tools that make it."""
