"""Jobs: keyword-only functions, each also run by a thin absl main in launch/."""
