"""`python -m peerpull_proto`: generate the protobuf modules now (install time), print where."""

from peerpull_proto import generated_dir

print(generated_dir())
