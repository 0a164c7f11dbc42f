"""JJ-VMed's library: one noun per module. The scripts at the top of the repository are its users;
nothing here imports them, and nothing here imports test code."""
