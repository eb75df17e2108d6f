"""The supervisor daemon: runs and heals every mexc process (`mexc run`)."""
