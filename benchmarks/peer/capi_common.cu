#include "capi.hpp"

extern "C" const char* dash_last_error() { return dash::peer::last_error().c_str(); }
