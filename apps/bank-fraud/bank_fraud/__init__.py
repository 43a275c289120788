"""bank-fraud: a card-fraud detector trained across banks, a Flower app."""
