# Import the package first so the system OpenBLAS is loaded before mlx.core (see sd35m_mlx/_blas.py).
import sd35m_mlx  # noqa: F401
