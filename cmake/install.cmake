# `cmake --install` yields a package that find_package(dash CONFIG REQUIRED) finds.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS dash dash_io EXPORT dashTargets)
install(DIRECTORY include/dash DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT dashTargets NAMESPACE dash:: DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/dash)

configure_package_config_file(cmake/dashConfig.cmake.in ${PROJECT_BINARY_DIR}/dashConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/dash)
# Header-only: the package fits any architecture.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/dashConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/dashConfig.cmake ${PROJECT_BINARY_DIR}/dashConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/dash)
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/dash)
